"""
Test helpers shipped with mtasts_twisted (like C{treq.testing}).

A loopback "test world" that tests of this package, and of relays that embed
it, start in-process on 127.0.0.1 with ephemeral ports: an authoritative DNS
server, an HTTPS policy server and SMTP servers, plus the glue that points a
resolver and TLS trust at them.  And in-memory fakes for unit tests.

  - L{mtasts_twisted.testing.world}: L{LoopbackWorld<world.LoopbackWorld>},
    all of the below wired together.
  - L{mtasts_twisted.testing.dns}: an authoritative DNS server with
    scripted faults.
  - L{mtasts_twisted.testing.https}: an HTTPS policy server (SNI, routes,
    stalls) and a static host-name resolver.
  - L{mtasts_twisted.testing.smtp}: an ESMTP server with scripted replies
    and STARTTLS behaviour.
  - L{mtasts_twisted.testing.tlsrpt}: an HTTPS report receiver and a
    recording mailer.
  - L{mtasts_twisted.testing.pki}: a private CA issuing good and bad
    certificates.
  - L{mtasts_twisted.testing.postfix}: a throw-away Postfix instance.
  - L{mtasts_twisted.testing.postgres}: a throw-away PostgreSQL cluster.
  - L{mtasts_twisted.testing.memory}: C{MemoryStore}, a fake DNS resolver
    and a fake policy fetcher.
  - L{mtasts_twisted.testing.sinks}: C{ListSink}, a result sink that keeps
    what it is given.

Every fake provides the interface it stands in for (C{tests/test_testing.py}
checks each with C{verifyObject}).
"""
