"""
Test helpers shipped with mtasts_twisted (like C{treq.testing}).

A loopback "test world" that tests of this package, and of relays that embed
it, start in-process on 127.0.0.1 with ephemeral ports: an authoritative DNS
server, an HTTPS policy server and SMTP servers, plus the glue that points a
resolver and TLS trust at them.
"""
