"""
Fuzzing and bad input (issue 9), with hypothesis: only the documented error
types ever come out, servers answer or close and never crash.

  - policy text, STS and TLSRPT TXT records: mutations of valid inputs;
  - the socketmap request handler and connection: random payloads, random
    byte streams cut anywhere, huge lengths — and random garbage over a real
    TCP connection, after which the server still answers;
  - TLSRPT JSON: results, failure details and policy descriptors round-trip,
    and any report built from them is valid JSON with the same counts;
  - DNS replies: random bytes as the UDP reply to the resolver end in a DNS
    error, never in another exception.

Example counts are modest so the suite stays fast; C{MTASTS_FUZZ_EXAMPLES}
raises them (tests/make_reliability_report.py does).
"""

from __future__ import annotations

import json
import random

import dns.message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.dns import DNSError, DNSResolver, TXTAnswer
from mtasts_twisted.policy import (
    MultipleRecordsError,
    NoRecordError,
    NotSTSRecordError,
    NotTLSRPTRecordError,
    PolicySyntaxError,
    RecordSyntaxError,
    parse_policy,
    parse_sts_record,
    parse_tlsrpt_record,
    select_sts_record,
    select_tlsrpt_record,
)
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.socketmap import (
    MAX_REPLY,
    NetstringDecoder,
    NetstringError,
    SocketmapFactory,
    SocketmapSettings,
    encode_netstring,
)
from mtasts_twisted.store import MemoryStore
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver
from mtasts_twisted.tlsrpt.aggregate import merge_results
from mtasts_twisted.tlsrpt.report import Report, ReportSettings
from tests.test_faults import fuzz_examples, tally
from tests.clients import RawClient

N = fuzz_examples(60)
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID_POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"
VALID_STS = "v=STSv1; id=20240101T000000"
VALID_TLSRPT = "v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://r.example.com/v1"
_SPECIALS = ["", " ", "\t", ";", ":", "=", ",", "\r", "\n", "\x00", "\ufeff", "é", "*.", "%", "%zz", "v=STSv1",
             "v=TLSRPTv1", "id=", "rua=", "mode: none", "max_age: 99999999999", "mx: ", ".."]


def _mutate(data: str, edits: list[tuple[int, int, str]]) -> str:
    for kind, pos, text in edits:
        pos = pos % (len(data) + 1)
        if kind == 0:
            data = data[:pos] + text + data[pos:]
        elif kind == 1:
            data = data[:pos] + data[pos + 1 + len(text):]
        else:
            data = data[:pos] + text + data[pos + len(text):]
    return data


_edits = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 400), st.one_of(st.sampled_from(_SPECIALS), st.text(max_size=6))),
    min_size=1,
    max_size=6,
)


class ParserFuzzTests(SynchronousTestCase):
    """Mutations of valid inputs: the parsers raise only their documented errors."""

    @FUZZ
    @given(_edits, st.booleans())
    def test_policy_mutations(self, edits, as_bytes) -> None:
        tally("fuzz_examples")
        text = _mutate(VALID_POLICY.decode(), edits)
        data = text.encode("utf-8", "surrogatepass") if as_bytes else text
        try:
            policy = parse_policy(data)
        except PolicySyntaxError as e:
            self.assertTrue(e.reason)
            return
        # Whatever parses is stable under its own serialisation.
        self.assertEqual(parse_policy(policy.to_text()), policy)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_policy_random_bytes(self, data) -> None:
        tally("fuzz_examples")
        try:
            parse_policy(data)
        except PolicySyntaxError:
            pass

    @FUZZ
    @given(_edits)
    def test_sts_record_mutations(self, edits) -> None:
        tally("fuzz_examples")
        text = _mutate(VALID_STS, edits)
        try:
            record = parse_sts_record(text)
        except (NotSTSRecordError, RecordSyntaxError) as e:
            self.assertTrue(e.reason)
            return
        self.assertRegex(record.id, r"\A[A-Za-z0-9]{1,32}\Z")

    @FUZZ
    @given(_edits)
    def test_tlsrpt_record_mutations(self, edits) -> None:
        tally("fuzz_examples")
        text = _mutate(VALID_TLSRPT, edits)
        try:
            record = parse_tlsrpt_record(text)
        except (NotTLSRPTRecordError, RecordSyntaxError) as e:
            self.assertTrue(e.reason)
            return
        self.assertTrue(record.rua)

    @FUZZ
    @given(st.lists(st.one_of(st.sampled_from([VALID_STS, VALID_TLSRPT]), _edits.map(lambda e: _mutate(VALID_STS, e)),
                              st.text(max_size=40)), max_size=5))
    def test_select_records(self, strings) -> None:
        tally("fuzz_examples")
        for select in (select_sts_record, select_tlsrpt_record):
            try:
                select(strings)
            except (NoRecordError, MultipleRecordsError, RecordSyntaxError) as e:
                self.assertTrue(e.reason)


# --- socketmap ------------------------------------------------------------------------------------

_ALLOWED = (b"OK ", b"NOTFOUND ", b"TEMP ", b"PERM ", b"TIMEOUT ")


def _socketmap() -> tuple[SocketmapFactory, Clock]:
    clock = Clock()
    clock.advance(1_700_000_000)
    resolver = FakeResolver()
    fetcher = FakeFetcher()
    resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
    resolver.mx["example.com"] = [(10, "mx1.example.com")]
    fetcher.policies["example.com"] = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"
    cache = PolicyCache(MemoryStore(), resolver, fetcher, clock)
    return SocketmapFactory(cache, resolver, clock, SocketmapSettings(idle_timeout=60.0)), clock


_keys = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda k: b"postfix " + k, st.binary(max_size=60)),
    st.builds(lambda k: b"postfix " + k.encode("utf-8", "surrogatepass"), st.text(max_size=60)),
    st.sampled_from([b"postfix example.com", b"postfix [example.com]:25", b"postfix .example.com",
                     b"postfix [192.0.2.1]", b"postfix " + b"a" * 300, b"postfix \x00", b" ", b""]),
)


class SocketmapFuzzTests(SynchronousTestCase):
    """The request handler and the connection, fed anything."""

    def assertAnswers(self, data: bytes) -> list[bytes]:
        answers = NetstringDecoder(MAX_REPLY + 10).feed(data)
        for answer in answers:
            self.assertTrue(answer.startswith(_ALLOWED), answer[:60])
        return answers

    @FUZZ
    @given(st.lists(_keys, min_size=1, max_size=6))
    def test_requests_answered(self, payloads) -> None:
        """Every well-framed request, whatever it says, gets exactly one answer, in order."""
        tally("fuzz_examples")
        factory, clock = _socketmap()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"".join(encode_netstring(p) for p in payloads if len(p) <= 10000))
        clock.advance(1)
        answers = self.assertAnswers(transport.value())
        self.assertEqual(len(answers), len([p for p in payloads if len(p) <= 10000]))
        self.assertFalse(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(factory.connections, 0)

    @FUZZ
    @given(st.binary(max_size=400), st.lists(st.integers(1, 50), max_size=10))
    def test_random_stream_cut_anywhere(self, data, cuts) -> None:
        """Random bytes in random pieces: valid answers, or a close; never an exception."""
        tally("fuzz_examples")
        factory, clock = _socketmap()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        pos = 0
        for cut in cuts + [len(data)]:
            proto.dataReceived(data[pos:pos + cut])
            pos += cut
            if pos >= len(data):
                break
        clock.advance(1)
        self.assertAnswers(transport.value())
        proto.connectionLost(None)
        self.assertEqual(factory.connections, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    @FUZZ
    @given(st.integers(10001, 10**30), st.binary(max_size=30))
    def test_huge_lengths_close_without_buffering(self, length, tail) -> None:
        tally("fuzz_examples")
        decoder = NetstringDecoder(10000)
        with self.assertRaises(NetstringError):
            decoder.feed(b"%d:" % length + tail)
        factory, _ = _socketmap()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"%d" % length)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    @FUZZ
    @given(st.lists(st.binary(min_size=1, max_size=30), min_size=1, max_size=8))
    def test_partial_frames(self, payloads) -> None:
        """Valid frames fed one byte at a time all come out; nothing is answered early."""
        tally("fuzz_examples")
        decoder = NetstringDecoder(10000)
        wire = b"".join(encode_netstring(p) for p in payloads)
        out = []
        for i in range(len(wire)):
            out.extend(decoder.feed(wire[i:i + 1]))
        self.assertEqual(out, payloads)
        self.assertEqual(decoder.buffered, 0)


class SocketmapTCPFuzzTests(TestCase):
    """Random garbage over real TCP connections; the server keeps serving."""

    timeout = 30

    async def test_garbage_over_tcp(self) -> None:
        factory, _ = _socketmap()
        factory.clock = reactor
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        rng = random.Random(8461)
        rounds = max(20, N // 3)
        for i in range(rounds):
            client = await connectProtocol(endpoint, RawClient())
            garbage = rng.randbytes(rng.randrange(1, 3000))
            if i % 3 == 0:
                garbage = encode_netstring(b"postfix example.com") + garbage
            client.transport.write(garbage)
            # Then close our side; the server must answer or close, never hang or crash.
            await deferLater(reactor, 0.01, lambda: None)
            client.transport.loseConnection()
            await client.closed
            NetstringDecoder(MAX_REPLY + 10).feed(client.data)  # what came back is well-framed
            tally("fuzz_examples")
        client = await connectProtocol(endpoint, RawClient())
        client.transport.write(encode_netstring(b"postfix example.com"))
        for _ in range(100):
            if client.data:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertTrue(client.data.startswith(b"50:OK secure match=mx1.example.com") or
                        b"OK secure" in client.data, client.data)
        client.transport.loseConnection()
        await client.closed
        for _ in range(100):
            if factory.connections == 0:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(factory.connections, 0)


# --- TLSRPT JSON --------------------------------------------------------------------------------

_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z", fullmatch=True)
_domain = st.builds(lambda a, b: f"{a}.{b}", _label, st.sampled_from(["example", "test", "com"]))
_text = st.text(max_size=40)
_opt = lambda s: st.one_of(st.none(), s)  # noqa: E731
_details = st.builds(
    FailureDetails,
    result_type=st.sampled_from(list(ResultType)),
    sending_mta_ip=_opt(st.ip_addresses().map(str)),
    receiving_mx_hostname=_opt(_domain),
    receiving_mx_helo=_opt(_text),
    receiving_ip=_opt(st.ip_addresses().map(str)),
    failed_session_count=st.integers(1, 10**6),
    # RFC 8460 §4.4: a URI.
    additional_information=_opt(st.builds(lambda label: "https://reports.example/" + label, _label)),
    failure_reason_code=_opt(_text),
)
_descriptor = st.builds(
    PolicyDescriptor,
    policy_type=st.sampled_from(list(PolicyType)),
    policy_domain=_domain,
    policy_strings=st.lists(_text, max_size=4),
    mx_hosts=st.lists(_domain, max_size=3),
)
_result = st.builds(Result, policy=_descriptor, success_count=st.integers(0, 10**6),
                    failures=st.lists(_details, max_size=3))


class TLSRPTJSONFuzzTests(SynchronousTestCase):
    @FUZZ
    @given(_result)
    def test_result_round_trip(self, result) -> None:
        tally("fuzz_examples")
        wire = json.loads(json.dumps(result.to_json(), ensure_ascii=False, allow_nan=False))
        self.assertEqual(Result.from_json(wire), result)
        for details in result.failures:
            self.assertEqual(FailureDetails.from_json(details.to_json()), details)
        self.assertEqual(PolicyDescriptor.from_json(result.policy.to_json()), result.policy)

    @FUZZ
    @given(st.lists(_result, min_size=1, max_size=6), _domain)
    def test_report_builder(self, results, domain) -> None:
        tally("fuzz_examples")
        merged = merge_results(results)
        report_settings = ReportSettings("Org", "sender.example", "tlsrpt@sender.example", "tlsrpt@sender.example")
        report = Report.build(report_settings, domain, "2024-05-01", "abc123", merged)
        parsed = json.loads(report.json_bytes().decode("utf-8"))
        self.assertEqual(len(parsed["policies"]), len(merged))
        total_ok = sum(p["summary"]["total-successful-session-count"] for p in parsed["policies"])
        total_failed = sum(p["summary"]["total-failure-session-count"] for p in parsed["policies"])
        self.assertEqual(total_ok, sum(r.success_count for r in results))
        self.assertEqual(total_failed, sum(r.failure_count for r in results))
        self.assertEqual([Result.from_json(p) for p in parsed["policies"]], list(report.results))

    @FUZZ
    @given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), _text),
                        lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_text, c, max_size=3)),
                        max_leaves=8))
    def test_from_json_garbage(self, obj) -> None:
        """Arbitrary JSON never parses into a wrong result silently: it is refused with a plain error."""
        tally("fuzz_examples")
        for cls in (Result, FailureDetails, PolicyDescriptor):
            try:
                cls.from_json(obj)
            except (KeyError, TypeError, ValueError, AttributeError):
                pass


# --- DNS replies --------------------------------------------------------------------------------


class _FakeUDPPort:
    def __init__(self, protocol: DatagramProtocol) -> None:
        self.protocol = protocol
        self.sent: list[bytes] = []
        self.peer = None

    def connect(self, host: str, port: int) -> None:
        self.peer = (host, port)

    def write(self, data: bytes, addr: object = None) -> None:
        self.sent.append(data)

    def stopListening(self) -> None:
        self.protocol.doStop()

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 40000)


class _FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[_FakeUDPPort] = []

    def listenUDP(self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192):
        fake = _FakeUDPPort(protocol)
        self.ports.append(fake)
        protocol.makeConnection(fake)
        return fake

    def connectTCP(self, host: str, port: int, factory: object, timeout: float = 30, bindAddress: object = None):
        """A reply with TC set sends the resolver to TCP: refuse it."""
        connector = _FakeConnector()
        self.callLater(0, factory.clientConnectionFailed, connector, Failure(ConnectionRefusedError()))
        return connector


class _FakeConnector:
    def stopConnecting(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 53)


class DNSReplyFuzzTests(SynchronousTestCase):
    """Random bytes as the UDP reply: a DNS error (or an answer), never another exception."""

    def lookup_with_reply(self, make_reply) -> object:
        fake = _FakeReactor()
        resolver = DNSResolver(fake, ["127.0.0.1:53"], timeout=1.0, attempts=1, budget=2.0, cache_size=0)
        d = resolver.lookup_txt("_mta-sts.example.com")
        outcome: list[object] = []
        d.addBoth(outcome.append)
        port = fake.ports[-1]
        query = dns.message.from_wire(port.sent[-1])
        port.protocol.datagramReceived(make_reply(query), ("127.0.0.1", 53))
        fake.advance(5)
        self.assertEqual(len(outcome), 1, "the lookup never finished")
        self.assertEqual(fake.getDelayedCalls(), [])
        return outcome[0]

    def assertDNSOutcome(self, outcome: object) -> None:
        if isinstance(outcome, TXTAnswer):
            return
        self.assertTrue(hasattr(outcome, "check") and outcome.check(DNSError), outcome)

    @FUZZ
    @given(st.binary(max_size=600), st.booleans())
    def test_random_reply(self, data, with_id) -> None:
        tally("fuzz_examples")
        outcome = self.lookup_with_reply(lambda q: (q.id.to_bytes(2, "big") + data) if with_id else data)
        self.assertDNSOutcome(outcome)

    @FUZZ
    @given(st.lists(st.tuples(st.integers(2, 400), st.integers(0, 255)), min_size=1, max_size=8))
    def test_corrupted_real_reply(self, corruptions) -> None:
        """A genuine reply with bytes overwritten after the ID."""
        tally("fuzz_examples")

        def make(query: dns.message.Message) -> bytes:
            response = dns.message.make_response(query)
            response.answer.append(dns.rrset.from_text(query.question[0].name, 300, "IN", "TXT", '"v=STSv1; id=1"'))
            wire = bytearray(response.to_wire())
            for pos, value in corruptions:
                if pos < len(wire):
                    wire[pos] = value
            return bytes(wire)

        outcome = self.lookup_with_reply(make)
        self.assertDNSOutcome(outcome)


class DNSReplyOverUDPTests(TestCase):
    """The same over a real loopback UDP socket: a rogue server answering random bytes."""

    timeout = 30

    async def test_random_replies_over_udp(self) -> None:
        rng = random.Random(1035)

        class Rogue(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: object) -> None:
                body = rng.randbytes(rng.randrange(0, 700))
                self.transport.write((data[:2] + body) if rng.random() < 0.8 else body, addr)

        port = reactor.listenUDP(0, Rogue(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        resolver = DNSResolver(reactor, [f"127.0.0.1:{port.getHost().port}"], timeout=0.2, attempts=1,
                               cache_size=0)
        for i in range(max(15, N // 4)):
            try:
                await resolver.lookup_txt(f"_mta-sts.n{i}.example")
            except DNSError:
                pass
            tally("fuzz_examples")


# --- the relay's SMTP intake ------------------------------------------------------------------

try:
    from mtasts_twisted.relay import RelaySettings, RelaySMTPFactory
except ImportError:  # the relay may not be there yet
    RelaySMTPFactory = None

_COMMANDS = [b"EHLO fuzz.test", b"HELO fuzz.test", b"MAIL FROM:<a@fuzz.test>", b"RCPT TO:<b@dest.test>",
             b"RCPT TO:<nodomain>", b"DATA", b"RSET", b"NOOP", b"VRFY x", b"QUIT", b"STARTTLS", b"AUTH PLAIN",
             b"BDAT 10 LAST", b"MAIL FROM:<a@fuzz.test> SIZE=999999999999", b".", b"..", b"Subject: x",
             b"\x00", b"MAIL FROM:<\x00@x>", b"RCPT TO:<\xff@dest.test>", b"X" * 9000, b""]


class RelayIntakeFuzzTests(TestCase):
    """
    Random command streams (known verbs in random order, huge lines, bare LF
    and CR, NUL, random bytes) over real TCP to the relay's intake: it
    answers or closes, never crashes, and every message it answered 250
    for is in the queue (accepted means durable) — no other.
    """

    timeout = 60

    async def test_random_sessions(self) -> None:
        if RelaySMTPFactory is None:
            raise SkipTest("mtasts_twisted.relay is not available")
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="mtasts-fuzz-queue-")
        self.addCleanup(shutil.rmtree, directory, True)
        settings = RelaySettings(reporting_mta="relay.test", idle_timeout=2.0, max_message_size=100_000)
        queue = settings.make_queue(directory)
        queue.recover()
        factory = RelaySMTPFactory(queue, settings, reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        rng = random.Random(5321)
        accepted = 0
        rounds = max(25, N // 2)
        for _ in range(rounds):
            client = await connectProtocol(endpoint, RawClient())
            parts = []
            for _ in range(rng.randrange(1, 25)):
                choice = rng.random()
                if choice < 0.7:
                    parts.append(rng.choice(_COMMANDS) + rng.choice([b"\r\n", b"\r\n", b"\n", b"\r", b""]))
                else:
                    # ASCII garbage (controls and NUL included); non-ASCII
                    # verbs: see test_non_ascii_verb.
                    parts.append(bytes(rng.randrange(0, 128) for _ in range(rng.randrange(1, 200))))
            client.transport.write(b"".join(parts))
            await deferLater(reactor, 0.02, lambda: None)
            client.transport.loseConnection()
            await client.closed
            accepted += client.data.count(b"250 2.0.0 Ok: queued")
            for line in client.data.split(b"\r\n"):
                if line:
                    self.assertRegex(line, rb"\A[2-5]\d\d[ -]", line[:80])
            tally("fuzz_examples")
        # A well-formed transaction still goes through after all that.
        client = await connectProtocol(endpoint, RawClient())
        client.transport.write(b"EHLO ok.test\r\nMAIL FROM:<a@ok.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        await deferLater(reactor, 0.1, lambda: None)
        client.transport.write(b"Subject: ok\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        for _ in range(300):
            if client.closed.called:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertIn(b"250 2.0.0 Ok: queued", client.data)
        accepted += 1
        await client.closed
        await factory.wait_closed()
        self.assertEqual(len(queue.list()), accepted)
        self.assertEqual(factory.connections, 0)

    async def test_non_ascii_verb(self) -> None:
        """A command word with a non-ASCII byte gets a 500 reply, not an exception."""
        if RelaySMTPFactory is None:
            raise SkipTest("mtasts_twisted.relay is not available")
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="mtasts-fuzz-queue-")
        self.addCleanup(shutil.rmtree, directory, True)
        settings = RelaySettings(reporting_mta="relay.test", idle_timeout=2.0)
        queue = settings.make_queue(directory)
        factory = RelaySMTPFactory(queue, settings, reactor)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), RawClient())
        client.transport.write(b"EHLO ok.test\r\nMA\xbcL FROM:<a@ok.test>\r\nNOOP\r\n")
        for _ in range(100):
            if client.data.count(b"\r\n250 ") >= 2 or client.closed.called:
                break
            await deferLater(reactor, 0.01, lambda: None)
        client.transport.loseConnection()
        await client.closed
        await factory.wait_closed()
        crashed = self.flushLoggedErrors(UnicodeDecodeError)
        self.assertEqual(crashed, [], "an exception escaped the SMTP server protocol")
        self.assertIn(b"\r\n500 ", client.data)
        self.assertTrue(client.data.rstrip().endswith(b"Ok"), client.data[-80:])
