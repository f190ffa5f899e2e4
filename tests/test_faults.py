"""
The fault matrix (issue 9): hostile DNS servers, policy hosts and MX hosts,
on real loopback sockets, exercised through the public entry points only
(L{PolicyCache.get}, L{discover}, L{Deliverer.deliver}).

Every case is one test generated from a table, so a failure names the case.
Each case checks, besides its own outcome and TLSRPT result:

  - the timeouts fire (the case finishes within a bound);
  - nothing leaks: the open file descriptors (C{/proc/self/fd}), the
    reactor's delayed calls and the unfired L{Deferred}s are the same after
    the case (once the reactor has settled) as before it, and the policy
    cache has no lookup in flight;
  - the process stays healthy: a normal lookup and an enforced, verified
    delivery to a healthy domain work before and after the fault.

The module also holds the helpers the other reliability modules share
(L{Harness}, the rogue servers, L{tally}); it exports no other TestCase.
"""

from __future__ import annotations

import gc
import io
import json
import os
import random
import sys
import time
import weakref
from typing import Any, Awaitable, Callable

import attrs
import dns.flags
import dns.message
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from mtasts_twisted.cache import PolicyCache, PolicyLookupTemporaryError
from mtasts_twisted.delivery import Deliverer, DeliveryResult, DeliverySettings, Status
from mtasts_twisted.dns import DNSResolver
from mtasts_twisted.fetch import PolicyFetcher, discover
from mtasts_twisted.policy import Mode
from mtasts_twisted.results import PolicyType, Result, ResultType
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour
from mtasts_twisted.testing.dns import listen_udp_and_tcp
from mtasts_twisted.testing.https import PolicyServer, Route
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import Behaviour, Reply, SMTPTestServer, Stage, StartTLS
from mtasts_twisted.testing.world import LoopbackWorld

# --- shared helpers ------------------------------------------------------------------

#: When set, tests append one JSON line per counted event to this file
#: (tests/make_reliability_report.py sums them into RELIABILITY.md).
STATS_ENV = "MTASTS_RELIABILITY_STATS"


def tally(kind: str, n: int = 1) -> None:
    """Count C{n} events of C{kind} for the reliability report."""
    path = os.environ.get(STATS_ENV)
    if not path or n <= 0:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": kind, "n": n}) + "\n")


def probe(name: str, value: float) -> None:
    """
    Record a measured figure (bytes, seconds, counts) for the reliability
    report, which shows the largest value of each probe.  A probe is never
    asserted on here: the tests assert bounds, the report shows the figure.
    """
    path = os.environ.get(STATS_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "probe", "name": name, "value": value}) + "\n")


def fuzz_examples(default: int) -> int:
    """Hypothesis example count: C{MTASTS_FUZZ_EXAMPLES} overrides C{default}."""
    value = os.environ.get("MTASTS_FUZZ_EXAMPLES")
    return int(value) if value else default


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + [f"max_age: {max_age}"]
    return "\n".join(lines) + "\n"


def failures(results: tuple[Result, ...] | list[Result]) -> list[tuple[str, str | None]]:
    return [(f.result_type.value, f.failure_reason_code) for r in results for f in r.failures]


class DeferredTracker:
    """
    Records every L{Deferred} made while active (weakly), so that those
    still alive and unfired after a case — leaked waits — can be listed.
    """

    #: Modules whose Deferreds are the test runner's own (trial -j reports
    #: results and log events to its manager over AMP).
    IGNORED = ("twisted.trial", "twisted.protocols.amp", "twisted.logger")

    def __init__(self) -> None:
        self.created: weakref.WeakSet[Deferred[Any]] = weakref.WeakSet()
        self._original = Deferred.__init__

    def __enter__(self) -> DeferredTracker:
        original, created, ignored = self._original, self.created, self.IGNORED

        def __init__(d: Deferred[Any], *args: Any, **kwargs: Any) -> None:
            original(d, *args, **kwargs)
            frame = sys._getframe(1)
            for _ in range(20):  # the first caller outside twisted.internet.defer
                if frame is None or frame.f_globals.get("__name__") != "twisted.internet.defer":
                    break
                frame = frame.f_back
            if frame is not None and str(frame.f_globals.get("__name__", "")).startswith(ignored):
                return
            created.add(d)

        Deferred.__init__ = __init__  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        Deferred.__init__ = self._original  # type: ignore[method-assign]

    def unfired(self) -> list[Deferred[Any]]:
        gc.collect()
        return [d for d in list(self.created) if not d.called]


HEALTHY = "healthy.test"
HEALTHY_MX = "mx.healthy.test"
SENDER = "alice@sender.test"
MESSAGE = b"Subject: reliability\r\n\r\nHello.\r\n"


class Harness:
    """
    A mixin (not a TestCase) for trial tests: the loopback world (DNS, HTTPS
    policy server, real fetcher), a policy cache over a memory store, a
    healthy domain with an enforce policy and a verified MX, SMTP servers,
    and the leak and health checks.
    """

    timeout = 30
    fetch_timeout = 1.0
    dns_timeout = 0.3

    def setUp(self) -> None:
        self.world = LoopbackWorld.start(reactor, fetch_timeout=self.fetch_timeout, dns_timeout=self.dns_timeout)
        self.addCleanup(self.world.stop)
        self.pki = self.world.pki
        self.cache = PolicyCache(MemoryStore(), self.world.resolver, self.world.fetcher, reactor)
        self.sink = ListSink()
        self.ports: dict[str, int] = {}
        self.healthy = self.smtp(Behaviour(certificate=self.pki.valid(HEALTHY_MX)), HEALTHY_MX, HEALTHY)
        self.world.publish(HEALTHY, policy_text("enforce", HEALTHY_MX))
        self.health_checks = 0

    # -- building the world --

    def smtp(self, behaviour: Behaviour, host: str, domain: str | None = None, preference: int = 10) -> SMTPTestServer:
        """Start an SMTP server for MX host C{host} (of C{domain}, if given)."""
        server = SMTPTestServer(behaviour, reactor=reactor)
        self.ports[host] = server.start()
        self.addCleanup(server.stop)
        self.world.dns.remove(host, "A")
        self.world.dns.add_a(host, "127.0.0.1")
        if domain is not None:
            self.world.dns.add_mx(domain, preference, host)
        return server

    def deliverer(self, reply_timeout: float = 2.0, session_timeout: float = 10.0, cache: Any = None,
                  resolver: Any = None) -> Deliverer:
        return Deliverer(
            reactor,
            resolver or self.world.resolver,
            cache or self.cache,
            trust_root=self.pki.ca_pem,
            sink=self.sink,
            settings=DeliverySettings(
                port=1, port_for=self.ports, connect_timeout=2, reply_timeout=reply_timeout,
                session_timeout=session_timeout,
            ),
            rng=random.Random(1),
        )

    async def deliver(self, recipient: str, **kwargs: Any) -> DeliveryResult:
        return await self.deliverer(**kwargs).deliver(SENDER, [recipient], io.BytesIO(MESSAGE))

    # -- health and leaks --

    async def health(self) -> None:
        """A fresh lookup (DNS + HTTPS) and a verified delivery to the healthy domain work."""
        self.health_checks += 1
        self.world.resolver.clear_cache()
        await self.cache.delete(HEALTHY)
        policy, result, fresh = await self.cache.get(HEALTHY)
        self.assertEqual((policy.mode, fresh, result.failures), (Mode.ENFORCE, True, ()))
        before = len(self.healthy.messages)
        outcome = (await self.deliver("bob@" + HEALTHY)).outcomes[0]
        self.assertEqual((outcome.status, outcome.verified), (Status.DELIVERED, True), outcome)
        self.assertEqual(len(self.healthy.messages), before + 1)
        self.assertEqual(self.healthy.plaintext_transactions(), [])

    def snapshot(self) -> tuple[int, int, int]:
        return len(os.listdir("/proc/self/fd")), len(reactor.getDelayedCalls()), len(self.cache._inflight)

    async def settle(self, target: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
        """
        Let closing connections go: wait (at most 3 s) until the counts equal
        C{target}, or, without one, until they stayed the same for 0.1 s.
        """
        current = self.snapshot()
        stable = 0
        for _ in range(150):
            await deferLater(reactor, 0.02, lambda: None)
            previous, current = current, self.snapshot()
            if target is not None:
                if current == target:
                    break
                continue
            stable = stable + 1 if current == previous else 0
            if stable >= 5:
                break
        return current

    async def fault(self, run: Callable[[], Awaitable[Any]], bound: float = 10.0) -> Any:
        """
        Run one fault case between a health check and leak checks.

        @param bound: seconds the case may take (its timeouts must fire).
        """
        await self.health()
        before = await self.settle()
        started = time.monotonic()
        with DeferredTracker() as tracker:
            value = await run()
            elapsed = time.monotonic() - started
            self.assertLess(elapsed, bound, "the case's timeouts did not fire in time")
            after = await self.settle(target=before[:2] + (0,))
        self.assertEqual(after[0], before[0], "file descriptors leaked")
        self.assertEqual(after[1], before[1], "delayed calls leaked")
        self.assertEqual(after[2], 0, "policy lookups still in flight")
        self.assertEqual(tracker.unfired(), [], "Deferreds left waiting")
        await self.health()
        tally("fault_case")
        return value


# --- rogue servers ------------------------------------------------------------------


class _EndlessTCPDNS(Protocol):
    """Answers a TCP query with an endless stream of 65535-byte frames (wrong ID)."""

    def connectionMade(self) -> None:
        self.sent = 0
        self.factory.connections.append(self)
        self.loop = LoopingCall(self.pump)
        self.loop.clock = reactor
        self.loop.start(0.005)

    def pump(self) -> None:
        if self.sent >= self.factory.max_frames:
            self.loop.stop()
            return
        for _ in range(8):
            self.transport.write(b"\xff\xff" + b"\x00\x00" + b"x" * 65533)
            self.sent += 1

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()
        self.factory.closed += 1


class _TruncatingUDP(DatagramProtocol):
    """Answers every query with an empty, truncated reply: go to TCP."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.TC
        self.transport.write(reply.to_wire(), addr)


class RogueDNS:
    """A nameserver whose TCP answers are endless (more than 64 KiB and on)."""

    def __init__(self, max_frames: int = 2000) -> None:
        self.factory = Factory.forProtocol(_EndlessTCPDNS)
        self.factory.connections = []
        self.factory.closed = 0
        self.factory.max_frames = max_frames
        self.udp, self.tcp, self._closing = listen_udp_and_tcp(reactor, _TruncatingUDP, self.factory)
        self.nameserver = f"127.0.0.1:{self.udp.getHost().port}"

    async def stop(self) -> None:
        for proto in self.factory.connections:
            proto.transport.abortConnection()
        await maybeDeferred(self.udp.stopListening)
        await maybeDeferred(self.tcp.stopListening)
        for closing in self._closing:
            await closing


class _Trickle(Protocol):
    """An HTTP/1.1 answer written one byte per tick (bounded), after C{fast} bytes at once."""

    def dataReceived(self, data: bytes) -> None:
        if getattr(self, "loop", None) is not None:
            return
        self.factory.requests += 1
        answer = self.factory.answer
        fast = self.factory.fast
        self.transport.write(answer[:fast])
        self.rest = iter(answer[fast:])
        self.loop = LoopingCall(self.drip)
        self.loop.clock = reactor
        self.loop.start(self.factory.interval, now=False)

    def drip(self) -> None:
        byte = next(self.rest, None)
        if byte is None:
            self.loop.stop()
            return
        self.factory.dripped += 1
        self.transport.write(bytes([byte]))

    def connectionLost(self, reason: Any = None) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None and loop.running:
            loop.stop()
        self.factory.closed += 1
        self.factory.connections.discard(self)

    def connectionMade(self) -> None:
        self.factory.connections.add(self)


class TrickleHTTPS:
    """
    An HTTPS policy host that sends its answer one byte per C{interval}
    seconds (after the first C{fast} bytes): the slowloris of servers.
    """

    def __init__(self, pki: Any, host: str, body: bytes, fast: int, interval: float = 1.0) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
        factory = Factory.forProtocol(_Trickle)
        factory.answer = head + body
        factory.fast = fast if fast >= 0 else len(head) + fast
        factory.interval = interval
        factory.requests = factory.closed = factory.dripped = 0
        factory.connections = set()
        self.factory = factory
        tls = TLSMemoryBIOFactory(pki.valid(host).server_options(), False, factory)
        self.listening = reactor.listenTCP(0, tls, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    async def stop(self) -> None:
        for proto in list(self.factory.connections):
            proto.transport.abortConnection()
        await maybeDeferred(self.listening.stopListening)


class _RawSMTP(Protocol):
    def connectionMade(self) -> None:
        self.factory.sessions += 1
        self.factory.live.add(self)
        self.received = b""
        self.lines_sent = 0
        self.loop = None
        greeting = self.factory.greeting
        if callable(greeting):
            self.loop = LoopingCall(self.pump, greeting())
            self.loop.clock = reactor
            self.loop.start(self.factory.interval)
        else:
            self.transport.write(greeting)

    def pump(self, lines: Any) -> None:
        for _ in range(self.factory.burst):
            line = next(lines, None)
            if line is None:
                self.loop.stop()
                return
            self.lines_sent += 1
            self.transport.write(line)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.factory.received += data
        for trigger, answer in self.factory.script:
            if trigger in self.received and answer is not None:
                self.received = b""
                self.transport.write(answer)
                break

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.factory.live.discard(self)
        self.factory.lines_sent = max(self.factory.lines_sent, self.lines_sent)
        self.factory.closed += 1


class RawSMTP:
    """
    A scripted, byte-level SMTP peer for what SMTPTestServer cannot say:
    garbage greetings, endless multiline replies, bare LF, injected lines.

    @param greeting: bytes sent on connect, or a callable returning an
        iterator of lines sent C{burst} at a time every C{interval} s.
    @param script: C{(trigger, answer)} pairs: when C{trigger} appears in
        the input, C{answer} is sent.
    """

    def __init__(self, greeting: Any, script: tuple = (), interval: float = 0.01, burst: int = 200) -> None:
        factory = Factory.forProtocol(_RawSMTP)
        factory.greeting = greeting
        factory.script = script
        factory.interval = interval
        factory.burst = burst
        factory.sessions = factory.closed = factory.lines_sent = 0
        factory.received = b""
        factory.live = set()
        self.factory = factory
        self.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    @property
    def received(self) -> bytes:
        return self.factory.received

    async def stop(self) -> None:
        for proto in list(self.factory.live):
            proto.transport.abortConnection()
        await maybeDeferred(self.listening.stopListening)


# --- the tables --------------------------------------------------------------------------

VICTIM = "victim.test"
VICTIM_MX = "mx1.victim.test"
ENFORCE = policy_text("enforce", VICTIM_MX)
FETCH_ERROR = ResultType.STS_POLICY_FETCH_ERROR.value
POLICY_INVALID = ResultType.STS_POLICY_INVALID.value
WEBPKI = ResultType.STS_WEBPKI_INVALID.value


def _padded(size: int) -> bytes:
    """A valid enforce policy padded with blank lines to exactly C{size} bytes."""
    text = ENFORCE.encode()
    return text + b"\n" * (size - len(text))


@attrs.frozen
class DNSCase:
    """A DNS fault for C{PolicyCache.get(VICTIM)}."""

    setup: Callable[[Any], Any]
    #: "policy": the enforce policy is found; "temporary": lookup fails
    #: temporarily (dns-lookup); "none": no policy with this failure.
    expect: str
    failure: tuple[str, str | None] | None = None
    bound: float = 5.0


def _behave(*behaviours: DNSBehaviour, name: str = "_mta-sts." + VICTIM) -> Callable[[Any], None]:
    return lambda t: t.world.dns.set_behaviour(name, *behaviours)


def _many_txt(t: Any) -> None:
    for i in range(230):
        t.world.dns.add_txt("_mta-sts." + VICTIM, f"unrelated-{i}-" + "z" * 250)


def _cname_loop(t: Any) -> None:
    t.world.dns.remove("_mta-sts." + VICTIM, "TXT")
    t.world.dns.add_cname("_mta-sts." + VICTIM, "a.loop." + VICTIM)
    t.world.dns.add_cname("a.loop." + VICTIM, "b.loop." + VICTIM)
    t.world.dns.add_cname("b.loop." + VICTIM, "a.loop." + VICTIM)


def _two_records(t: Any) -> None:
    t.world.dns.add_txt("_mta-sts." + VICTIM, "v=STSv1; id=2")


def _txt_syntax(t: Any) -> None:
    t.world.dns.remove("_mta-sts." + VICTIM, "TXT")
    t.world.dns.add_txt("_mta-sts." + VICTIM, "v=STSv1; id=not valid!")


DNS_CASES: dict[str, DNSCase] = {
    "txt_timeout": DNSCase(_behave(DNSBehaviour.DROP), "temporary", (FETCH_ERROR, "dns-lookup")),
    "txt_servfail": DNSCase(_behave(DNSBehaviour.SERVFAIL), "temporary", (FETCH_ERROR, "dns-lookup")),
    "txt_refused": DNSCase(_behave(DNSBehaviour.REFUSED), "temporary", (FETCH_ERROR, "dns-lookup")),
    "txt_malformed_reply": DNSCase(_behave(DNSBehaviour.MALFORMED), "temporary", (FETCH_ERROR, "dns-lookup")),
    "txt_truncated_then_tcp": DNSCase(_behave(DNSBehaviour.TRUNCATE), "policy"),
    "txt_truncated_tcp_silent": DNSCase(
        _behave(DNSBehaviour.TRUNCATE, DNSBehaviour.DROP_TCP), "temporary", (FETCH_ERROR, "dns-lookup")
    ),
    "txt_wrong_question": DNSCase(_behave(DNSBehaviour.WRONG_QUESTION), "policy"),
    "txt_spoofed_id": DNSCase(_behave(DNSBehaviour.WRONG_ID), "policy"),
    "txt_wrong_source_port": DNSCase(_behave(DNSBehaviour.WRONG_SOURCE), "policy"),
    "txt_all_spoofs_over_tcp": DNSCase(
        _behave(DNSBehaviour.TRUNCATE, DNSBehaviour.WRONG_ID, DNSBehaviour.WRONG_QUESTION), "policy"
    ),
    "txt_many_rrs_60k_over_tcp": DNSCase(_many_txt, "policy"),
    "txt_cname_loop": DNSCase(_cname_loop, "temporary", (FETCH_ERROR, "dns-lookup")),
    "txt_two_sts_records": DNSCase(_two_records, "none", (FETCH_ERROR, "multiple-mta-sts-records")),
    "txt_syntax_error": DNSCase(_txt_syntax, "none", (FETCH_ERROR, "record-syntax-error")),
    "policy_host_servfail": DNSCase(
        _behave(DNSBehaviour.SERVFAIL, name="mta-sts." + VICTIM), "none", (FETCH_ERROR, None)
    ),
    "policy_host_timeout": DNSCase(
        _behave(DNSBehaviour.DROP, name="mta-sts." + VICTIM), "none", (FETCH_ERROR, None)
    ),
}


@attrs.frozen
class HTTPSCase:
    """A policy host fault for C{PolicyCache.get(VICTIM)} (TXT record fine)."""

    setup: Callable[[Any], Any]
    #: (result type, reason) of the lookup; None: the enforce policy is found.
    failure: tuple[str, str] | None
    bound: float = 5.0


def _route(route: Route, certificate: str | None = None) -> Callable[[Any], None]:
    def setup(t: Any) -> None:
        host = "mta-sts." + VICTIM
        cert = None
        if certificate == "expired":
            cert = t.pki.expired(host)
        elif certificate == "wrong_name":
            cert = t.pki.valid("other.example.net")
        elif certificate == "untrusted":
            cert = t.pki.untrusted(host)
        elif certificate == "sni_ignored":
            # The server ignores SNI and presents its default certificate.
            cert = t.pki.valid("policy-server.invalid")
        t.world.https.serve(host, route, certificate=cert)

    return setup


def _redirect(t: Any) -> None:
    t.world.publish("elsewhere.test", ENFORCE)
    t.world.https.serve(
        "mta-sts." + VICTIM, Route.redirect("https://mta-sts.elsewhere.test/.well-known/mta-sts.txt")
    )
    t.forbidden_host = "mta-sts.elsewhere.test"


def _trickle(fast: int) -> Callable[[Any], Awaitable[None]]:
    async def setup(t: Any) -> None:
        server = TrickleHTTPS(t.pki, "mta-sts." + VICTIM, ENFORCE.encode(), fast=fast, interval=1.0)
        t.addCleanup(server.stop)
        t.trickle = server
        t.fetcher_port = server.port

    return setup


def _legacy(t: Any) -> None:
    legacy = PolicyServer(reactor, t.pki, legacy_tls=True)
    legacy.start()
    t.addCleanup(legacy.stop)
    legacy.serve("mta-sts." + VICTIM, Route.policy(ENFORCE))
    t.fetcher_port = legacy.port
    t.legacy = legacy


def _closed_port(t: Any) -> None:
    from socket import socket

    s = socket()
    s.bind(("127.0.0.1", 0))
    t.fetcher_port = s.getsockname()[1]
    s.close()


HTTPS_CASES: dict[str, HTTPSCase] = {
    "stall_before_headers": HTTPSCase(_route(Route.stall_headers()), (FETCH_ERROR, "cannot-fetch-policy")),
    "stall_mid_body": HTTPSCase(_route(Route.stall_body(ENFORCE, after=10)), (FETCH_ERROR, "cannot-fetch-policy")),
    "trickle_1_byte_per_s_headers": HTTPSCase(_trickle(5), (FETCH_ERROR, "cannot-fetch-policy")),
    "trickle_1_byte_per_s_body": HTTPSCase(_trickle(-10), (FETCH_ERROR, "cannot-fetch-policy")),
    "reset": HTTPSCase(_route(Route.reset_connection()), (FETCH_ERROR, "cannot-fetch-policy")),
    "connection_refused": HTTPSCase(_closed_port, (FETCH_ERROR, "cannot-fetch-policy")),
    "endless_chunked_body": HTTPSCase(_route(Route.endless_body()), (POLICY_INVALID, "policy-syntax-error")),
    "body_65536_bytes": HTTPSCase(_route(Route.policy(_padded(65536))), None),
    "body_65537_bytes": HTTPSCase(_route(Route.policy(_padded(65537))), (POLICY_INVALID, "policy-syntax-error")),
    "body_65537_bytes_chunked": HTTPSCase(
        _route(Route(body=_padded(65537), chunked=True, chunk_size=4096)), (POLICY_INVALID, "policy-syntax-error")
    ),
    "redirect_to_valid_policy": HTTPSCase(_redirect, (FETCH_ERROR, "cannot-fetch-policy")),
    "content_type_html": HTTPSCase(
        _route(Route.policy(ENFORCE, content_type="text/html")), (FETCH_ERROR, "wrong-content-type")
    ),
    "content_type_missing": HTTPSCase(_route(Route(body=ENFORCE, content_type=None)), (FETCH_ERROR, "wrong-content-type")),
    "status_404": HTTPSCase(_route(Route.status_only(404)), (FETCH_ERROR, "no-policy-served")),
    "status_500": HTTPSCase(_route(Route.status_only(500)), (FETCH_ERROR, "cannot-fetch-policy")),
    "policy_syntax_error": HTTPSCase(_route(Route.policy("version: STSv1\nmode: sometimes\n")),
                                     (POLICY_INVALID, "policy-syntax-error")),
    "tls_1_0_1_1_only": HTTPSCase(_legacy, (FETCH_ERROR, "cannot-fetch-policy")),
    "cert_expired": HTTPSCase(_route(Route.policy(ENFORCE), "expired"), (WEBPKI, "certificate-expired")),
    "cert_wrong_name": HTTPSCase(_route(Route.policy(ENFORCE), "wrong_name"), (WEBPKI, "certificate-host-mismatch")),
    "cert_untrusted": HTTPSCase(_route(Route.policy(ENFORCE), "untrusted"), (WEBPKI, "certificate-not-trusted")),
    "sni_ignored_default_cert": HTTPSCase(
        _route(Route.policy(ENFORCE), "sni_ignored"), (WEBPKI, "certificate-host-mismatch")
    ),
}


@attrs.frozen
class SMTPCase:
    """An MX host fault for C{Deliverer.deliver} to VICTIM (enforce unless C{mode})."""

    behaviour: Callable[[Any], Behaviour] | None
    status: Status
    #: The TLSRPT session results: (successes, [(result type, reason)]).
    sessions: tuple[int, tuple[tuple[str, str | None], ...]] | None
    mode: str | None = "enforce"
    reply_timeout: float = 2.0
    bound: float = 8.0
    #: For raw peers: a callable building a RawSMTP (instead of behaviour).
    raw: Callable[[], RawSMTP] | None = None
    #: Whether the message may (must) have reached the server.
    arrived: bool = False


def _valid(**kwargs: Any) -> Callable[[Any], Behaviour]:
    return lambda t: Behaviour(certificate=t.pki.valid(VICTIM_MX), **kwargs)


def _reply(stage: Stage, code: int, text: str = "scripted") -> Callable[[Any], Behaviour]:
    return _valid(replies={stage: Reply(code, text)})


_OK1 = (1, ())
_NONE = (0, ())
_REFUSED = (0, ((ResultType.STARTTLS_NOT_SUPPORTED.value, "starttls-refused-454"),))
_NOT_OFFERED = (0, ((ResultType.STARTTLS_NOT_SUPPORTED.value, "starttls-not-offered"),))
_ALERT = (0, ((ResultType.VALIDATION_FAILURE.value, "tls-alert-protocol-version"),))


def _endless_multiline() -> Any:
    return (b"220-line %d of a greeting that never ends\r\n" % i for i in range(200000))


def _trickled_multiline() -> Any:
    return (b"220-still greeting %d\r\n" % i for i in range(10000))


SMTP_CASES: dict[str, SMTPCase] = {
    "starttls_refused_enforce": SMTPCase(_valid(starttls=StartTLS.REFUSE), Status.TRANSIENT, _REFUSED),
    "starttls_refused_no_policy": SMTPCase(
        _valid(starttls=StartTLS.REFUSE), Status.DELIVERED, _NONE, mode=None, arrived=True
    ),
    "starttls_not_offered_enforce": SMTPCase(_valid(starttls=StartTLS.NOT_OFFERED), Status.TRANSIENT, _NOT_OFFERED),
    "tls_alert_mid_handshake_enforce": SMTPCase(_valid(starttls=StartTLS.ALERT), Status.TRANSIENT, _ALERT),
    "tls_alert_mid_handshake_no_policy": SMTPCase(
        _valid(starttls=StartTLS.ALERT), Status.DELIVERED,
        (0, ((ResultType.VALIDATION_FAILURE.value, "tls-alert-protocol-version"),)), mode=None, arrived=True,
    ),
    "cert_expired_enforce": SMTPCase(
        lambda t: Behaviour(certificate=t.pki.expired(VICTIM_MX)), Status.TRANSIENT,
        (0, ((ResultType.CERTIFICATE_EXPIRED.value, "X509_V_ERR_CERT_HAS_EXPIRED"),)),
    ),
    "reply_line_600_octets": SMTPCase(_reply(Stage.END_OF_DATA, 250, "x" * 600), Status.DELIVERED, _OK1,
                                      arrived=True),
    "reply_line_20000_octets_greeting": SMTPCase(_reply(Stage.GREETING, 220, "x" * 20000), Status.TRANSIENT, _NONE),
    "reply_line_20000_octets_mail": SMTPCase(_reply(Stage.MAIL, 451, "x" * 20000), Status.TRANSIENT, _OK1),
    "reply_line_20000_octets_end_of_data": SMTPCase(
        _reply(Stage.END_OF_DATA, 250, "x" * 20000), Status.TRANSIENT, _OK1, arrived=True
    ),
    "garbage_greeting": SMTPCase(None, Status.TRANSIENT, _NONE,
                                 raw=lambda: RawSMTP(b"\x00\xffgarbage \x1b[31m\r\n")),
    "multiline_garbage_greeting": SMTPCase(
        None, Status.TRANSIENT, _NONE, raw=lambda: RawSMTP(b"220-hello\r\n\x00\x01\xfe\xff\r\n220 ok\r\n")
    ),
    "multiline_mixed_codes": SMTPCase(None, Status.TRANSIENT, _NONE, reply_timeout=0.5,
                                      raw=lambda: RawSMTP(b"220-hello\r\n554 go away\r\n")),
    "bare_lf_greeting": SMTPCase(None, Status.TRANSIENT, _NONE, reply_timeout=0.5,
                                 raw=lambda: RawSMTP(b"220 hello\n250 more\n")),
    "endless_multiline_greeting": SMTPCase(
        None, Status.TRANSIENT, _NONE, reply_timeout=3.0, raw=lambda: RawSMTP(_endless_multiline, burst=2000)
    ),
    "trickled_multiline_greeting": SMTPCase(
        None, Status.TRANSIENT, _NONE, reply_timeout=0.6,
        raw=lambda: RawSMTP(_trickled_multiline, interval=0.05, burst=1),
    ),
    "disconnect_mid_data": SMTPCase(_valid(drop_during_data=True), Status.TRANSIENT, _OK1, arrived=True),
}
for _stage in Stage:
    SMTP_CASES[f"stall_at_{_stage.name.lower()}"] = SMTPCase(
        _valid(stall_at=_stage),
        Status.TRANSIENT,
        _NONE if _stage in (Stage.GREETING, Stage.EHLO, Stage.STARTTLS) else _OK1,
        reply_timeout=0.5,
        arrived=_stage is Stage.END_OF_DATA,
    )
for _stage, _code, _status in [
    (Stage.GREETING, 421, Status.TRANSIENT),
    (Stage.GREETING, 554, Status.TRANSIENT),
    (Stage.EHLO, 421, Status.TRANSIENT),
    (Stage.MAIL, 451, Status.TRANSIENT),
    (Stage.MAIL, 550, Status.PERMANENT),
    (Stage.DATA, 451, Status.TRANSIENT),
    (Stage.DATA, 554, Status.PERMANENT),
    (Stage.END_OF_DATA, 452, Status.TRANSIENT),
    (Stage.END_OF_DATA, 552, Status.PERMANENT),
]:
    SMTP_CASES[f"reply_{_code}_at_{_stage.name.lower()}"] = SMTPCase(
        _reply(_stage, _code), _status, _NONE if _stage in (Stage.GREETING, Stage.EHLO) else _OK1,
        arrived=_stage is Stage.END_OF_DATA,
    )
# EHLO 5xx: the client falls back to HELO, which offers no STARTTLS.
SMTP_CASES["reply_550_at_ehlo"] = SMTPCase(_reply(Stage.EHLO, 550), Status.TRANSIENT, _NOT_OFFERED)
for _code, _status in [(450, Status.TRANSIENT), (550, Status.PERMANENT)]:
    SMTP_CASES[f"reply_{_code}_at_rcpt"] = SMTPCase(
        _valid(recipient_replies={"bob@" + VICTIM: Reply(_code, "scripted")}), _status, _OK1
    )


# --- the tests ----------------------------------------------------------------------------


class DNSFaultTests(Harness, unittest.TestCase):
    """DNS faults, through PolicyCache.get (and discover)."""

    async def run_dns(self, case: DNSCase) -> None:
        self.world.publish(VICTIM, ENFORCE)
        case.setup(self)

        async def run() -> None:
            try:
                lookup = await self.cache.get(VICTIM)
            except PolicyLookupTemporaryError as e:
                self.assertEqual(case.expect, "temporary", e)
                self.assertEqual(e.result.policy.policy_type, PolicyType.STS)
                self.assertEqual(failures([e.result]), [case.failure])
                return
            if case.expect == "policy":
                self.assertEqual((lookup.policy.mode, lookup.fresh, lookup.result.failures), (Mode.ENFORCE, True, ()))
                found = await discover(self.world.resolver, self.world.fetcher, VICTIM)
                self.assertEqual(found.policy, lookup.policy)
            else:
                self.assertEqual(case.expect, "none", lookup)
                self.assertIsNone(lookup.policy)
                [failure] = lookup.result.failures
                self.assertEqual(failure.result_type.value, case.failure[0])
                if case.failure[1] is not None:
                    self.assertEqual(failure.failure_reason_code, case.failure[1])

        await self.fault(run, case.bound)

    async def test_txt_huge_tcp_answer_stream(self) -> None:
        """A nameserver streaming >64 KiB over TCP (frames without our ID) is cut off by the timeout."""
        rogue = RogueDNS()
        self.addCleanup(rogue.stop)
        resolver = DNSResolver(reactor, [rogue.nameserver], timeout=0.5, attempts=1)
        cache = PolicyCache(MemoryStore(), resolver, self.world.fetcher, reactor)

        async def run() -> None:
            with self.assertRaises(PolicyLookupTemporaryError) as caught:
                await cache.get(VICTIM)
            self.assertEqual(failures([caught.exception.result]), [(FETCH_ERROR, "dns-lookup")])
            self.assertIn("TCP", str(caught.exception))

        await self.fault(run, 3.0)
        self.assertEqual(rogue.factory.closed, len(rogue.factory.connections))
        self.assertGreater(max(p.sent for p in rogue.factory.connections), 1)

    async def test_txt_over_budget(self) -> None:
        """A lookup never takes longer than the resolver's budget, whatever the attempts."""
        resolver = DNSResolver(reactor, [self.world.dns.nameserver] * 3, timeout=0.3, attempts=10, budget=0.8)
        self.world.dns.set_behaviour("_mta-sts." + VICTIM, DNSBehaviour.DROP)
        cache = PolicyCache(MemoryStore(), resolver, self.world.fetcher, reactor)

        async def run() -> None:
            started = time.monotonic()
            with self.assertRaises(PolicyLookupTemporaryError):
                await cache.get(VICTIM)
            self.assertLess(time.monotonic() - started, 1.5)

        await self.fault(run, 2.0)


class DeliveryDNSFaultTests(Harness, unittest.TestCase):
    """DNS faults of the MX and MX host lookups, through Deliverer.deliver."""

    async def setup_victim(self, mode: str | None = "enforce") -> SMTPTestServer:
        if mode is not None:
            self.world.publish(VICTIM, policy_text(mode, VICTIM_MX))
        server = SMTPTestServer(Behaviour(certificate=self.pki.valid(VICTIM_MX)), reactor=reactor)
        self.ports[VICTIM_MX] = server.start()
        self.addCleanup(server.stop)
        return server

    async def check(self, status: Status, prefix: str, server: SMTPTestServer, results: list | None = None,
                    bound: float = 5.0) -> None:
        async def run() -> None:
            result = await self.deliver("bob@" + VICTIM)
            [outcome] = result.outcomes
            self.assertEqual(outcome.status, status, outcome)
            self.assertTrue(outcome.message.startswith(prefix), outcome.message)
            if results is not None:
                self.assertEqual(failures(result.results[1:]), results)

        await self.fault(run, bound)
        self.assertEqual(server.messages, [])
        self.assertEqual(server.plaintext_transactions(), [])

    async def test_mx_servfail(self) -> None:
        server = await self.setup_victim()
        self.world.dns.set_behaviour(VICTIM, DNSBehaviour.SERVFAIL, rdtype="MX")
        await self.check(Status.TRANSIENT, "4.4.3", server, [])

    async def test_mx_timeout(self) -> None:
        server = await self.setup_victim()
        self.world.dns.set_behaviour(VICTIM, DNSBehaviour.DROP, rdtype="MX")
        await self.check(Status.TRANSIENT, "4.4.3", server, [])

    async def test_mx_cname_loop(self) -> None:
        server = await self.setup_victim()
        self.world.dns.add_cname(VICTIM_MX, "loop1." + VICTIM)
        self.world.dns.add_cname("loop1." + VICTIM, "loop2." + VICTIM)
        self.world.dns.add_cname("loop2." + VICTIM, "loop1." + VICTIM)
        self.world.dns.add_mx(VICTIM, 10, VICTIM_MX)
        await self.check(Status.TRANSIENT, "4.7.5", server, [])

    async def test_mx_host_address_timeout(self) -> None:
        server = await self.setup_victim()
        self.world.dns.add_mx(VICTIM, 10, VICTIM_MX)
        self.world.dns.set_behaviour(VICTIM_MX, DNSBehaviour.DROP)
        await self.check(Status.TRANSIENT, "4.7.5", server, [])

    async def test_mx_ip_literal_enforce(self) -> None:
        """An MX exchange spelled like an IP address is outside any policy: not contacted."""
        server = await self.setup_victim()
        self.ports["127.0.0.1"] = server.port
        self.world.dns.add_mx(VICTIM, 10, "127.0.0.1")
        await self.check(
            Status.TRANSIENT, "4.7.5", server,
            [(ResultType.VALIDATION_FAILURE.value, "mtasts-policy-mx-mismatch")],
        )
        self.assertEqual(server.sessions, [])

    async def test_mx_ip_literal_no_policy(self) -> None:
        """Without a policy, an IP-shaped MX name is never taken as a verified host."""
        await self.setup_victim(mode=None)
        self.world.dns.add_mx(VICTIM, 10, "127.0.0.1")

        async def run() -> None:
            [outcome] = (await self.deliver("bob@" + VICTIM)).outcomes
            self.assertIn(outcome.status, (Status.TRANSIENT, Status.DELIVERED))
            self.assertFalse(outcome.verified)

        await self.fault(run)

    async def test_null_mx_enforce(self) -> None:
        server = await self.setup_victim()
        self.world.dns.add_mx(VICTIM, 0, ".")
        await self.check(Status.PERMANENT, "5.1.10", server, [])
        self.assertEqual(server.sessions, [])

    async def test_null_mx_no_policy(self) -> None:
        server = await self.setup_victim(mode=None)
        self.world.dns.add_mx(VICTIM, 0, ".")
        await self.check(Status.PERMANENT, "5.1.10", server, [])

    async def test_txt_servfail_defers(self) -> None:
        """No policy known and the TXT lookup fails: defer, contact nobody."""
        server = await self.setup_victim()
        self.world.dns.add_mx(VICTIM, 10, VICTIM_MX)
        self.world.dns.set_behaviour("_mta-sts." + VICTIM, DNSBehaviour.SERVFAIL)
        await self.check(Status.TRANSIENT, "4.4.3", server, [])
        self.assertEqual(server.sessions, [])


class HTTPSFaultTests(Harness, unittest.TestCase):
    """Policy host faults, through PolicyCache.get; the fetcher's timeout is 1 s."""

    async def run_https(self, case: HTTPSCase) -> None:
        self.fetcher_port = self.world.https.port
        self.forbidden_host = None
        self.world.publish(VICTIM, ENFORCE)
        setup = case.setup(self)
        if isinstance(setup, Awaitable):
            await setup
        fetcher = PolicyFetcher(
            reactor, trust_roots=self.pki.ca_pem, timeout=self.fetch_timeout,
            name_resolver=self.world.name_resolver, port=self.fetcher_port,
        )
        cache = PolicyCache(MemoryStore(), self.world.resolver, fetcher, reactor)

        async def run() -> None:
            started = time.monotonic()
            lookup = await cache.get(VICTIM)
            elapsed = time.monotonic() - started
            if case.failure is None:
                self.assertEqual((lookup.policy.mode, lookup.result.failures), (Mode.ENFORCE, ()))
                return
            self.assertIsNone(lookup.policy)
            self.assertEqual(lookup.result.policy.policy_type, PolicyType.STS)
            self.assertEqual(failures([lookup.result]), [case.failure])
            # Every fetch ends within the fetch timeout (plus slack).
            self.assertLess(elapsed, self.fetch_timeout + 1.5)
            # Backoff: a second lookup neither fetches nor fails open into a fetch storm.
            requests = len(self.world.https.requests)
            again = await cache.get(VICTIM)
            self.assertIsNone(again.policy)
            self.assertEqual(failures([again.result]), [(FETCH_ERROR, "back-off-after-recent-fetch-error")])
            self.assertEqual(len(self.world.https.requests), requests)

        await self.fault(run, case.bound)
        if self.forbidden_host is not None:
            self.assertEqual(self.world.https.request_count(self.forbidden_host), 0)
        trickle = getattr(self, "trickle", None)
        if trickle is not None:
            self.assertEqual(trickle.factory.closed, trickle.factory.requests)
            self.assertLessEqual(trickle.factory.dripped, 2)
        legacy = getattr(self, "legacy", None)
        if legacy is not None:
            self.assertEqual(legacy.requests, [])
        for served in self.world.https.requests:
            if served.host == "mta-sts." + VICTIM:
                self.assertTrue(served.finished.called)
                # The endless body was cut off near the cap, not drained.
                self.assertLess(served.body_bytes_sent, 1024 * 1024)


class SMTPFaultTests(Harness, unittest.TestCase):
    """MX host faults, through Deliverer.deliver (enforce unless the case says otherwise)."""

    async def run_smtp(self, case: SMTPCase) -> None:
        if case.mode is not None:
            self.world.publish(VICTIM, policy_text(case.mode, VICTIM_MX))
        raw = None
        server = None
        if case.raw is not None:
            raw = case.raw()
            self.addCleanup(raw.stop)
            self.ports[VICTIM_MX] = raw.port
            self.world.dns.add_a(VICTIM_MX, "127.0.0.1")
            self.world.dns.add_mx(VICTIM, 10, VICTIM_MX)
        else:
            server = self.smtp(case.behaviour(self), VICTIM_MX, VICTIM)

        async def run() -> None:
            result = await self.deliver("bob@" + VICTIM, reply_timeout=case.reply_timeout)
            [outcome] = result.outcomes
            self.assertEqual(outcome.status, case.status, outcome)
            if case.sessions is not None:
                successes = sum(r.success_count for r in result.results[1:])
                self.assertEqual((successes, tuple(failures(result.results[1:]))), case.sessions)
            self.assertEqual(self.sink.results[-len(result.results):], list(result.results))
            self.assertEqual(result.results[0].failures, ())

        await self.fault(run, case.bound)
        if raw is not None:
            self.assertNotIn(b"MAIL FROM", raw.received)
            self.assertEqual(raw.factory.closed, raw.factory.sessions)
            return
        if case.mode == "enforce":
            # Nothing of the message in plaintext, nothing over unverified TLS.
            self.assertEqual(server.plaintext_transactions(), [])
            for message in server.messages:
                self.assertTrue(message.tls and message.tls_at_mail)
        if not case.arrived:
            self.assertEqual([m for m in server.messages if m.complete], [])
        for session in server.sessions:
            self.assertTrue(session.closed)

    async def test_cert_changes_between_connections(self) -> None:
        """Verified once, then the MX presents an untrusted certificate: deferred, then fine again."""
        self.world.publish(VICTIM, ENFORCE)
        server = self.smtp(Behaviour(certificate=self.pki.valid(VICTIM_MX)), VICTIM_MX, VICTIM)
        first = (await self.deliver("bob@" + VICTIM)).outcomes[0]
        self.assertEqual((first.status, first.verified), (Status.DELIVERED, True))
        server.behaviour = Behaviour(certificate=self.pki.untrusted(VICTIM_MX))

        async def run() -> None:
            result = await self.deliver("bob@" + VICTIM)
            self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
            self.assertEqual(failures(result.results[1:]), [(ResultType.CERTIFICATE_NOT_TRUSTED.value,
                                                            "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY")])

        await self.fault(run)
        self.assertEqual(len(server.messages), 1)
        self.assertEqual(server.plaintext_transactions(), [])
        server.behaviour = Behaviour(certificate=self.pki.valid(VICTIM_MX))
        self.assertEqual((await self.deliver("bob@" + VICTIM)).outcomes[0].status, Status.DELIVERED)

    async def test_endless_multiline_is_capped(self) -> None:
        """A reply of endless continuation lines is cut off at the line cap, not at the timeout."""
        raw = RawSMTP(_endless_multiline, burst=2000)
        self.addCleanup(raw.stop)
        self.world.publish(VICTIM, ENFORCE)
        self.ports[VICTIM_MX] = raw.port
        self.world.dns.add_a(VICTIM_MX, "127.0.0.1")
        self.world.dns.add_mx(VICTIM, 10, VICTIM_MX)

        async def run() -> None:
            started = time.monotonic()
            [outcome] = (await self.deliver("bob@" + VICTIM, reply_timeout=20)).outcomes
            self.assertEqual(outcome.status, Status.TRANSIENT)
            self.assertIn("too many lines", outcome.message)
            self.assertLess(time.monotonic() - started, 5)

        await self.fault(run)
        self.assertLess(raw.factory.lines_sent, 200000)


def _generate(cls: type, table: dict[str, Any], method: str) -> None:
    for name, case in table.items():
        async def test(self: Any, case: Any = case) -> None:
            await getattr(self, method)(case)

        test.__name__ = f"test_{name}"
        test.__qualname__ = f"{cls.__name__}.test_{name}"
        test.__doc__ = f"fault case {name}"
        setattr(cls, test.__name__, test)


_generate(DNSFaultTests, DNS_CASES, "run_dns")
_generate(HTTPSFaultTests, HTTPS_CASES, "run_https")
_generate(SMTPFaultTests, SMTP_CASES, "run_smtp")
