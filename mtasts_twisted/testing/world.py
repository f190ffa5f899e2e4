"""
The loopback test world: one object that starts a DNS server and an HTTPS
policy server on 127.0.0.1, a private PKI, and the resolver, name resolver
and policy fetcher pointed at them.

Everything resolves through the test DNS server (C{mta-sts.<domain>} is an
A record for 127.0.0.1), and TLS trusts only the test CA: no monkeypatching
of the network stack.  Typical use in a trial test::

    world = LoopbackWorld.start(reactor)
    self.addCleanup(world.stop)
    world.publish("example.com", ENFORCE_POLICY, record_id="1")
    discovery = await discover(world.resolver, world.fetcher, "example.com")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IConnector, IDelayedCall, IListeningPort
from twisted.internet.protocol import DatagramProtocol

from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
from mtasts_twisted.fetch import PolicyFetcher
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.https import PolicyServer, Route
from mtasts_twisted.testing.pki import PKI

LOOPBACK = "127.0.0.1"


class WorldReactor(Protocol):
    """
    What a L{LoopbackWorld} needs of its reactor: C{IReactorUDP} and
    C{IReactorTCP} for its servers, C{IReactorTime} and C{IReactorTCP} for
    the resolver and the fetcher.  The global reactor has all of them.
    """

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> IListeningPort:
        """C{IReactorUDP.listenUDP}."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> IListeningPort:
        """C{IReactorTCP.listenTCP} (any C{IProtocolFactory})."""

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30.0, bindAddress: Any = None
    ) -> IConnector:
        """C{IReactorTCP.connectTCP}."""

    def seconds(self) -> float:
        """C{IReactorTime.seconds}."""

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object) -> IDelayedCall:
        """C{IReactorTime.callLater}."""

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """C{IReactorTime.getDelayedCalls}."""


class LoopbackWorld:
    """
    A DNS server, an HTTPS policy server and the clients configured for them.

    @ivar pki: the test L{PKI}; C{ca_file} is its CA as a PEM file.
    @ivar dns: the L{DNSTestServer}.
    @ivar https: the L{PolicyServer}.
    @ivar resolver: a L{DNSResolver} asking only C{dns}.
    @ivar fetcher: a L{PolicyFetcher} resolving through C{resolver},
        trusting only the test CA, connecting to C{https}'s port.
    """

    def __init__(self, reactor: WorldReactor, fetch_timeout: float = 5.0, dns_timeout: float = 1.0) -> None:
        """
        Start the servers on ephemeral loopback ports.

        @param reactor: the reactor (see L{WorldReactor}).
        @param fetch_timeout: the fetcher's timeout, in seconds.
        @param dns_timeout: the resolver's timeout per query, in seconds.
        """
        self.reactor = reactor
        self.pki = PKI()
        self.dns = DNSTestServer()
        self.https = PolicyServer(reactor, self.pki)
        self._tmp = tempfile.mkdtemp(prefix="mtasts-world-")
        self.ca_file = self.pki.write_ca_file(os.path.join(self._tmp, "ca.pem"))
        self.dns.start(reactor)
        self.https.start()
        self.resolver = DNSResolver(reactor, [self.dns.nameserver], timeout=dns_timeout, attempts=1)
        self.name_resolver = DNSHostnameResolver(self.resolver)
        self.fetcher = PolicyFetcher(
            reactor,
            trust_roots=self.pki.ca_pem,
            timeout=fetch_timeout,
            resolver=self.resolver,
            port=self.https.port,
        )

    @classmethod
    def start(cls, reactor: WorldReactor, **kwargs: Any) -> LoopbackWorld:
        """Start the servers on ephemeral loopback ports; return the world."""
        return cls(reactor, **kwargs)

    def publish(self, domain: str, policy: str | None, record_id: str = "1", ttl: int = 300) -> None:
        """
        Publish an MTA-STS policy for C{domain} (an A-label name): the
        C{_mta-sts} TXT record, the policy host's A record and the policy.

        @param policy: the policy text, or L{None} for a TXT record whose
            policy host serves 404.
        """
        self.dns.remove(f"_mta-sts.{domain}", "TXT")
        self.dns.add_txt(f"_mta-sts.{domain}", f"v=STSv1; id={record_id}", ttl=ttl)
        self.dns.remove(f"mta-sts.{domain}", "A")
        self.dns.add_a(f"mta-sts.{domain}", LOOPBACK, ttl=ttl)
        route = Route.status_only(404) if policy is None else Route.policy(policy)
        self.https.serve(f"mta-sts.{domain}", route)

    def publish_tlsrpt(self, domain: str, *rua: str) -> None:
        """Publish a C{_smtp._tls} record for C{domain} with C{rua} URIs."""
        self.dns.remove(f"_smtp._tls.{domain}", "TXT")
        self.dns.add_txt(f"_smtp._tls.{domain}", "v=TLSRPTv1; rua=" + ",".join(rua))

    def add_mx(self, domain: str, *hosts: str, preference: int = 10) -> None:
        """Add MX records for C{domain}; each host gets an A record for 127.0.0.1."""
        for host in hosts:
            self.dns.add_mx(domain, preference, host)
            self.dns.remove(host, "A")
            self.dns.add_a(host, LOOPBACK)

    def unpublish(self, domain: str) -> None:
        """Remove C{domain}'s C{_mta-sts} TXT record (the policy host stays)."""
        self.dns.remove(f"_mta-sts.{domain}", "TXT")

    def stop(self) -> Deferred[None]:
        """Stop both servers and remove the temporary files."""

        def clean(_: object) -> None:
            for name in os.listdir(self._tmp):
                os.unlink(os.path.join(self._tmp, name))
            os.rmdir(self._tmp)

        return gatherResults([self.dns.stop(), self.https.stop()], consumeErrors=True).addBoth(clean)
