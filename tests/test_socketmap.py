"""
Tests for L{mtasts_twisted.socketmap}: the netstring decoder (with
hypothesis), key parsing, answer rendering for every policy case, the
protocol over L{StringTransport} with a fake clock (pipelining, garbage,
broken netstrings, idle timeout), and over a real loopback TCP port.
"""

from __future__ import annotations

import gc
import socket

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mtasts_twisted.socketmap import protocol as socketmap_protocol
from mtasts_twisted.socketmap import server as socketmap_server
from mtasts_twisted.socketmap.answers import ANSWER_KINDS, answer_kind, cached_answer, fixed_answer, needs_mx_hosts
from mtasts_twisted.socketmap.deferreds import PENDING, result_now
from mtasts_twisted.cache import Lookup, PolicyCache
from mtasts_twisted.dns import DNSNoRecordError, DNSTemporaryError
from mtasts_twisted.fetch import FetchedPolicy
from mtasts_twisted.interfaces import IResultSink
from mtasts_twisted.policy import Mode, parse_policy
from mtasts_twisted.results import PolicyType
from mtasts_twisted.socketmap import (
    ImmediateWriter,
    MAX_REPLY,
    MalformedRequestError,
    NetstringDecoder,
    NetstringError,
    ParsedKey,
    SocketmapFactory,
    SocketmapSettings,
    encode_netstring,
    parse_key,
    parse_request,
    render_answer,
    render_failure,
)
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver, MemoryStore
from mtasts_twisted.testing.sinks import ListSink

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"
WILDCARD_ONLY = "version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n"
TESTING = "version: STSv1\nmode: testing\nmx: mx1.example.com\nmax_age: 86400\n"
NONE = "version: STSv1\nmode: none\nmax_age: 86400\n"

ATTRS = (
    " policy_type=sts policy_domain=example.com mx_host_pattern=mx1.example.com"
    " mx_host_pattern=*.example.net { policy_string = version: STSv1 }"
    " { policy_string = mode: enforce } { policy_string = mx: mx1.example.com }"
    " { policy_string = mx: *.example.net } { policy_string = max_age: 86400 }"
)


def netstrings(*payloads: bytes) -> bytes:
    return b"".join(encode_netstring(p) for p in payloads)


# --- netstrings ----------------------------------------------------------------------


class NetstringDecoderTests(SynchronousTestCase):
    def test_one(self):
        self.assertEqual(NetstringDecoder().feed(b"5:hello,"), [b"hello"])

    def test_empty_payload(self):
        self.assertEqual(NetstringDecoder().feed(b"0:,"), [b""])

    def test_several_in_one_chunk(self):
        d = NetstringDecoder()
        self.assertEqual(d.feed(b"1:a,2:bc,0:,3:d"), [b"a", b"bc", b""])
        self.assertEqual(d.buffered, 3)
        self.assertEqual(d.feed(b"ef,"), [b"def"])
        self.assertEqual(d.buffered, 0)

    def test_partial_length_and_comma(self):
        d = NetstringDecoder()
        self.assertEqual(d.feed(b"1"), [])
        self.assertEqual(d.feed(b"1:hello worl"), [])
        self.assertEqual(d.feed(b"d"), [])
        self.assertEqual(d.feed(b","), [b"hello world"])

    def test_byte_at_a_time(self):
        d = NetstringDecoder()
        data = netstrings(b"postfix example.com", b"x" * 9999, b"")
        out = []
        for i in range(len(data)):
            out.extend(d.feed(data[i:i + 1]))
        self.assertEqual(out, [b"postfix example.com", b"x" * 9999, b""])

    def test_limit_is_inclusive(self):
        self.assertEqual(NetstringDecoder(3).feed(b"3:abc,"), [b"abc"])
        self.assertRaises(NetstringError, NetstringDecoder(3).feed, b"4:abcd,")

    def test_huge_length_prefix(self):
        """A length over the limit fails as soon as its digits are seen."""
        d = NetstringDecoder(10000)
        self.assertRaises(NetstringError, d.feed, b"10001")
        self.assertRaises(NetstringError, NetstringDecoder(10000).feed, b"999999999999999999999")
        self.assertRaises(NetstringError, NetstringDecoder(10000).feed, b"99999:")

    def test_non_digit_length(self):
        for data in (b"x:a,", b":a,", b"1a:a,", b"-1:", b" 1:a,", b"\xff", b"+1:a,", b"\xd9\xa1:a,"):
            self.assertRaises(NetstringError, NetstringDecoder().feed, data)

    def test_missing_comma(self):
        self.assertRaises(NetstringError, NetstringDecoder().feed, b"1:ab")
        self.assertRaises(NetstringError, NetstringDecoder().feed, b"1:a;2:bc,")

    def test_leading_zeros(self):
        """cr.yp.to/proto/netstrings.txt: extra zeros at the front are prohibited."""
        self.assertRaises(NetstringError, NetstringDecoder().feed, b"01:a,")
        self.assertRaises(NetstringError, NetstringDecoder().feed, b"00")

    def test_error_keeps_earlier_frames_and_stays_broken(self):
        d = NetstringDecoder()
        with self.assertRaises(NetstringError) as caught:
            d.feed(b"1:a,1:b,garbage")
        self.assertEqual(caught.exception.frames, [b"a", b"b"])
        self.assertRaises(NetstringError, d.feed, b"1:c,")

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=40), max_size=8))
    def test_random_bytes_only_raise_netstring_error(self, chunks):
        d = NetstringDecoder(50)
        try:
            for chunk in chunks:
                for frame in d.feed(chunk):
                    self.assertLessEqual(len(frame), 50)
        except NetstringError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=10), st.data())
    def test_round_trip_any_split(self, payloads, data):
        stream = netstrings(*payloads)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
        d = NetstringDecoder(300)
        out = []
        start = 0
        for cut in cuts + [len(stream)]:
            out.extend(d.feed(stream[start:cut]))
            start = cut
        self.assertEqual(out, payloads)
        self.assertEqual(d.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=20), min_size=1, max_size=5), st.binary(min_size=1, max_size=20))
    def test_valid_prefix_then_garbage(self, payloads, garbage):
        d = NetstringDecoder(20)
        try:
            frames = d.feed(netstrings(*payloads) + garbage)
        except NetstringError as e:
            frames = e.frames
        self.assertEqual(frames[:len(payloads)], payloads)


# --- keys and requests ----------------------------------------------------------------


class ParseKeyTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(parse_key("example.com"), ParsedKey("example.com"))
        self.assertEqual(parse_key("Example.COM."), ParsedKey("example.com"))
        self.assertEqual(parse_key("[example.com]"), ParsedKey("example.com", True))
        self.assertEqual(parse_key("example.com:25"), ParsedKey("example.com", False, 25))
        self.assertEqual(parse_key("[Mail.Example.com.]:587"), ParsedKey("mail.example.com", True, 587))

    def test_idn(self):
        self.assertEqual(parse_key("Bücher.example"), ParsedKey("xn--bcher-kva.example"))
        self.assertEqual(parse_key("[bücher.example]:25"), ParsedKey("xn--bcher-kva.example", True, 25))

    def test_no_policy_domain(self):
        for key in ("[192.0.2.1]", "[192.0.2.1]:25", "[IPv6:2001:db8::1]", "[ipv6:2001:db8::1]:25",
                    "[2001:db8::1]", "192.0.2.1", "192.0.2.1:25", "2001:db8::1", ".example.com",
                    "[.example.com]"):
            self.assertIsNone(parse_key(key).domain, key)

    def test_malformed(self):
        for key in ("", "exa mple.com", "example.com\n", "\x00", "[example.com", "example.com]",
                    "[example.com]x", "example.com:", "example.com:0", "example.com:65536",
                    "example.com:http", "a:b:c", "under_score.example", "a..b", "[]", ":25",
                    "x" * 300):
            self.assertRaises(MalformedRequestError, parse_key, key)

    def test_request(self):
        self.assertEqual(parse_request(b"postfix example.com"), ("postfix", "example.com"))
        self.assertEqual(parse_request("m b\u00fccher.example".encode()), ("m", "b\u00fccher.example"))
        for data in (b"", b"postfix", b"postfix ", b" example.com", b"postfix \xff\xfe"):
            self.assertRaises(MalformedRequestError, parse_request, data)


# --- rendering --------------------------------------------------------------------------


class RenderTests(SynchronousTestCase):
    enforce = parse_policy(ENFORCE)
    hosts = ("mx1.example.com", "a.example.net", "b.c.example.net", "evil.example.org", "MX1.example.com.")

    def test_enforce_exact_mx_names(self):
        """Only MX hosts matching a pattern are listed; *. matches one label (RFC 8461 §4.1)."""
        self.assertEqual(
            render_answer("example.com", self.enforce, mx_hosts=self.hosts),
            "OK secure match=mx1.example.com:a.example.net servername=hostname",
        )

    def test_enforce_mx_unknown(self):
        """The peer's form, only when the MX hosts are unknown."""
        self.assertEqual(
            render_answer("example.com", self.enforce, mx_hosts=None),
            "OK secure match=mx1.example.com:.example.net servername=hostname",
        )

    def test_enforce_no_mx_matches(self):
        self.assertEqual(
            render_answer("example.com", self.enforce, mx_hosts=("evil.example.org",)),
            "OK secure match=mx1.example.com servername=hostname",
        )
        self.assertEqual(
            render_answer("example.com", self.enforce, mx_hosts=()),
            "OK secure match=mx1.example.com servername=hostname",
        )

    def test_enforce_wildcards_only_no_match(self):
        policy = parse_policy(WILDCARD_ONLY)
        self.assertEqual(
            render_answer("example.com", policy, mx_hosts=("mx.sub.example.com",)),
            "TEMP no MX host of example.com matches its MTA-STS policy",
        )
        self.assertEqual(
            render_answer("example.com", policy, mx_hosts=("mx.example.com",)),
            "OK secure match=mx.example.com servername=hostname",
        )

    def test_testing(self):
        policy = parse_policy(TESTING)
        self.assertEqual(render_answer("example.com", policy, mx_hosts=("mx1.example.com",)), "NOTFOUND ")
        self.assertEqual(
            render_answer("example.com", policy, SocketmapSettings(strict_testing=True), ("mx1.example.com",)),
            "OK secure match=mx1.example.com servername=hostname",
        )

    def test_none_and_no_policy(self):
        self.assertEqual(render_answer("example.com", parse_policy(NONE)), "NOTFOUND ")
        self.assertEqual(render_answer("example.com", None), "NOTFOUND ")
        tlsrpt = SocketmapSettings(tlsrpt_attributes=True)
        self.assertEqual(render_answer("example.com", parse_policy(NONE), tlsrpt), "NOTFOUND ")

    def test_tlsrpt_attributes(self):
        tlsrpt = SocketmapSettings(tlsrpt_attributes=True)
        self.assertEqual(
            render_answer("example.com", self.enforce, tlsrpt, ("mx1.example.com",)),
            "OK secure match=mx1.example.com servername=hostname" + ATTRS,
        )

    def test_tlsrpt_testing(self):
        policy = parse_policy(TESTING)
        answer = render_answer("example.com", policy, SocketmapSettings(tlsrpt_attributes=True))
        self.assertEqual(
            answer,
            "OK may policy_type=sts policy_domain=example.com mx_host_pattern=mx1.example.com"
            " { policy_string = version: STSv1 } { policy_string = mode: testing }"
            " { policy_string = mx: mx1.example.com } { policy_string = max_age: 86400 }",
        )
        dane = SocketmapSettings(tlsrpt_attributes=True, testing_level="dane")
        self.assertTrue(render_answer("example.com", policy, dane).startswith("OK dane policy_type=sts "))
        off = SocketmapSettings(tlsrpt_attributes=True, testing_level=None)
        self.assertEqual(render_answer("example.com", policy, off), "NOTFOUND ")

    def test_tlsrpt_brace_lines_left_out(self):
        policy = parse_policy(ENFORCE + "ext: a}b\n")
        answer = render_answer("example.com", policy, SocketmapSettings(tlsrpt_attributes=True), ())
        self.assertNotIn("a}b", answer)
        self.assertIn("{ policy_string = max_age: 86400 }", answer)

    def test_reply_limit(self):
        """socketmap_table(5): replies are at most 100000 characters."""
        text = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n"
        text += "".join(f"e{i}: v\n" for i in range(6000))
        policy = parse_policy(text)
        answer = render_answer("example.com", policy, SocketmapSettings(tlsrpt_attributes=True), ("mx1.example.com",))
        self.assertLessEqual(len(answer), MAX_REPLY)
        self.assertEqual(
            answer,
            "OK secure match=mx1.example.com servername=hostname policy_type=sts policy_domain=example.com"
            " mx_host_pattern=mx1.example.com",
        )

    def test_answer_kind(self):
        self.assertEqual(answer_kind("OK secure match=mx1.example.com servername=hostname"), "ok")
        self.assertEqual(answer_kind("NOTFOUND "), "notfound")
        self.assertEqual(answer_kind(render_failure("example.com", "dns-lookup")), "temp")
        self.assertEqual(answer_kind("PERM empty key"), "perm")
        self.assertEqual(ANSWER_KINDS, ("ok", "notfound", "temp", "perm"))

    def test_failure(self):
        self.assertEqual(
            render_failure("example.com", "dns-lookup"),
            "TEMP MTA-STS policy of example.com unavailable (dns-lookup)",
        )
        self.assertEqual(render_failure("example.com", "dns-lookup", SocketmapSettings(fail_open=True)), "NOTFOUND ")


# --- the protocol over StringTransport --------------------------------------------------


class ServerTestCase(SynchronousTestCase):
    settings = SocketmapSettings(idle_timeout=60.0)

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.resolver = FakeResolver()
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(MemoryStore(), self.resolver, self.fetcher, self.clock)
        self.sink = ListSink()
        self.registry = CollectorRegistry()
        self.counter = Counter("socketmap_requests", "requests", ["answer"], registry=self.registry)
        self.events = []
        self.patch(socketmap_server, "log", Logger(observer=self.events.append))
        self.factory = self.make_factory(self.settings)
        self.proto, self.transport = self.connect()

    def make_factory(self, settings):
        return SocketmapFactory(self.cache, self.resolver, self.clock, settings, sink=self.sink, metrics=self.counter)

    def connect(self, factory=None, host=None, transport=None):
        """Connect a protocol of C{factory} to a L{StringTransport} (from C{host}, if given)."""
        factory = factory or self.factory
        addr = None if host is None else IPv4Address("TCP", host, 40000)
        proto = factory.buildProtocol(addr)
        if proto is None:
            return None, None
        transport = transport or StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def publish(self, domain="example.com", text=ENFORCE, record_id="1", mx=(("mx1.example.com", 10),)):
        self.resolver.txt["_mta-sts." + domain] = [f"v=STSv1; id={record_id}"]
        self.fetcher.policies[domain] = text
        if mx is not None:
            self.resolver.mx[domain] = [(pref, host) for host, pref in mx]

    def send(self, *keys, name=b"postfix"):
        """Send C{name key} for every text key; bytes are sent as the whole payload."""
        self.proto.dataReceived(netstrings(*(k if isinstance(k, bytes) else name + b" " + k.encode() for k in keys)))

    def answers(self, transport=None):
        transport = transport or self.transport
        out = NetstringDecoder(MAX_REPLY).feed(transport.value())
        transport.clear()
        return [a.decode() for a in out]

    def ask(self, *keys, **kw):
        self.send(*keys, **kw)
        return self.answers()


class AnswerTests(ServerTestCase):
    def test_enforce_exact_mx(self):
        self.publish(mx=(("mx1.example.com", 10), ("b.example.net", 20), ("x.y.example.net", 30)))
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com:b.example.net servername=hostname"])

    def test_cached_answer_is_memoised(self):
        self.publish()
        first = self.ask("example.com", "EXAMPLE.com.", "example.com:25")
        self.assertEqual(len(set(first)), 1)
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 1)
        self.assertEqual(self.fetcher.fetches["example.com"], 1)
        self.assertEqual(self.factory.counts["ok"], 3)
        self.assertEqual(self.registry.get_sample_value("socketmap_requests_total", {"answer": "ok"}), 3)

    def test_mx_ttl_expiry(self):
        self.publish()
        self.ask("example.com")
        self.clock.advance(299)
        self.ask("example.com")
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 1)
        self.clock.advance(2)
        self.resolver.mx["example.com"] = [(10, "mx1.example.com"), (20, "new.example.net")]
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com:new.example.net servername=hostname"])
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 2)

    def test_mx_temporary_failure(self):
        self.publish(mx=None)
        self.resolver.mx["example.com"] = DNSTemporaryError("SERVFAIL", name="example.com", rdtype="MX")
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com:.example.net servername=hostname"])
        [event] = [e for e in self.events if e["log_level"].name == "warn"]
        self.assertEqual(event["domain"], "example.com")
        self.ask("example.com")
        self.assertEqual(len(self.events), 1)  # memoised: one warning per mx_retry
        self.clock.advance(61)
        self.resolver.mx["example.com"] = [(10, "a.example.net")]
        self.assertEqual(self.ask("example.com"), ["OK secure match=a.example.net servername=hostname"])

    def test_no_mx(self):
        self.publish(mx=None)
        self.resolver.mx["example.com"] = DNSNoRecordError("NXDOMAIN", name="example.com", rdtype="MX")
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com servername=hostname"])

    def test_exact_patterns_need_no_mx_lookup(self):
        exact = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: mx2.example.com\nmax_age: 86400\n"
        self.publish(text=exact, mx=(("elsewhere.example.net", 10),))
        self.assertEqual(self.ask("example.com"),
                         ["OK secure match=mx1.example.com:mx2.example.com servername=hostname"])
        self.assertEqual(self.resolver.queries[("MX", "example.com")], 0)

    def test_wildcard_only_no_match(self):
        self.publish(text=WILDCARD_ONLY, mx=(("mx.sub.example.com", 10),))
        self.assertEqual(self.ask("example.com"), ["TEMP no MX host of example.com matches its MTA-STS policy"])
        self.assertEqual(self.factory.counts["temp"], 1)

    def test_bracketed_next_hop_needs_no_mx(self):
        self.publish("relay.example.org", "version: STSv1\nmode: enforce\nmx: relay.example.org\nmax_age: 600\n",
                     mx=None)
        self.assertEqual(self.ask("[relay.example.org]:587"),
                         ["OK secure match=relay.example.org servername=hostname"])
        self.assertEqual(self.resolver.queries[("MX", "relay.example.org")], 0)

    def test_idn(self):
        self.publish("xn--bcher-kva.example", mx=(("mx1.example.com", 10),))
        self.assertEqual(self.ask("bücher.example"), ["OK secure match=mx1.example.com servername=hostname"])

    def test_testing_none_and_no_policy(self):
        self.publish("t.example", TESTING)
        self.publish("n.example", NONE)
        self.assertEqual(self.ask("t.example", "n.example", "nothing.example"), ["NOTFOUND "] * 3)
        self.assertEqual(self.factory.counts["notfound"], 3)

    def test_strict_testing_and_tlsrpt(self):
        self.factory = self.make_factory(SocketmapSettings(strict_testing=True, tlsrpt_attributes=True))
        self.proto, self.transport = self.connect()
        self.publish()
        self.publish("t.example", TESTING, mx=(("mx1.example.com", 10),))
        [enforce, testing] = self.ask("example.com", "t.example")
        self.assertEqual(enforce, "OK secure match=mx1.example.com servername=hostname" + ATTRS)
        self.assertTrue(testing.startswith("OK secure match=mx1.example.com servername=hostname policy_type=sts "))

    def test_tlsrpt_testing(self):
        self.factory = self.make_factory(SocketmapSettings(tlsrpt_attributes=True))
        self.proto, self.transport = self.connect()
        self.publish("t.example", TESTING, mx=None)
        [answer] = self.ask("t.example")
        self.assertTrue(answer.startswith("OK may policy_type=sts policy_domain=t.example "))
        self.assertEqual(sum(self.resolver.queries[k] for k in self.resolver.queries if k[0] == "MX"), 0)

    def test_temporary_failure(self):
        self.resolver.txt["_mta-sts.example.com"] = DNSTemporaryError("SERVFAIL", name="x", rdtype="TXT")
        self.assertEqual(self.ask("example.com"), ["TEMP MTA-STS policy of example.com unavailable (dns-lookup)"])
        self.assertEqual(self.sink.results[-1].policy.policy_type, PolicyType.STS)
        self.assertEqual(self.sink.results[-1].failures[0].failure_reason_code, "dns-lookup")

    def test_fail_open(self):
        self.factory = self.make_factory(SocketmapSettings(fail_open=True))
        self.proto, self.transport = self.connect()
        self.resolver.txt["_mta-sts.example.com"] = DNSTemporaryError("SERVFAIL", name="x", rdtype="TXT")
        self.assertEqual(self.ask("example.com"), ["NOTFOUND "])

    def test_policy_change_invalidates_memo(self):
        self.publish()
        self.ask("example.com")
        self.publish(text=ENFORCE.replace("mx1.example.com", "mx2.example.com"), record_id="2",
                     mx=(("mx2.example.com", 10),))
        self.clock.advance(self.resolver.ttl)  # the old TXT answer may be used until its TTL ends
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx2.example.com servername=hostname"])

    def test_sink_records_every_lookup(self):
        verifyObject(IResultSink, self.sink)
        self.publish()
        self.ask("example.com", "example.com", "nothing.example", "[192.0.2.1]")
        self.assertEqual([r.policy.policy_type for r in self.sink.results],
                         [PolicyType.STS, PolicyType.STS, PolicyType.NO_POLICY_FOUND])

    def test_literals_and_parent_domains(self):
        self.assertEqual(self.ask("[192.0.2.1]", "2001:db8::1", "[IPv6:2001:db8::1]:25", ".example.com"),
                         ["NOTFOUND "] * 4)
        self.assertEqual(sum(self.resolver.queries.values()), 0)

    def test_malformed_requests_answer_perm(self):
        self.publish()
        self.proto.dataReceived(netstrings(b"postfix", b"postfix ", b"", b"postfix \xff", b"\x00\x01 \x02",
                                           b"postfix a..b", b"postfix example.com"))
        answers = self.answers()
        self.assertEqual([a.split(" ")[0] for a in answers[:-1]], ["PERM"] * 6)
        self.assertEqual(answers[-1], "OK secure match=mx1.example.com servername=hostname")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.factory.counts["perm"], 6)

    def test_small_memo(self):
        self.factory = self.make_factory(SocketmapSettings(memo_size=1))
        self.proto, self.transport = self.connect()
        self.publish()
        self.publish("example.org", mx=(("mx1.example.com", 10),))
        for _ in range(3):
            self.assertEqual(self.ask("example.com", "example.org"),
                             ["OK secure match=mx1.example.com servername=hostname"] * 2)

    def test_internal_error_answers_temp(self):
        def broken(result, when=None):
            raise RuntimeError("sink bug")

        self.sink.record = broken
        self.publish()
        self.assertEqual(self.ask("example.com", "[192.0.2.1]"), ["TEMP internal error", "NOTFOUND "])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)  # logged to the patched logger
        self.assertIn("sink bug", str(self.events[-1]["log_failure"].value))
        self.assertFalse(self.transport.disconnecting)

    def test_map_names(self):
        self.factory = self.make_factory(SocketmapSettings(map_names=["postfix", "tls"]))
        self.proto, self.transport = self.connect()
        self.assertEqual(self.ask("nothing.example"), ["NOTFOUND "])
        self.assertEqual(self.ask("nothing.example", name=b"tls"), ["NOTFOUND "])
        [answer] = self.ask("nothing.example", name=b"other")
        self.assertTrue(answer.startswith("PERM unknown map name"))

    def test_only_the_configured_map_name_by_default(self):
        """
        By default only C{postfix} (README's C{main.cf} line,
        C{socketmap:inet:127.0.0.1:8461:postfix}) is answered: any other map
        name gets C{PERM}, even for a domain with a policy, so a map meant for
        another server is never answered with a TLS policy.
        """
        self.assertEqual(SocketmapSettings().map_names, frozenset({"postfix"}))
        self.publish()
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com servername=hostname"])
        for name in (b"transport", b"Postfix", b"postfix2"):
            [answer] = self.ask("example.com", name=name)
            self.assertEqual(answer, f"PERM unknown map name {name.decode()!r}")
        self.assertEqual(self.factory.counts["perm"], 3)
        self.assertEqual(self.factory.counts["ok"], 1)

    def test_any_map_name_when_configured_so(self):
        self.factory = self.make_factory(SocketmapSettings(map_names=None))
        self.proto, self.transport = self.connect()
        self.assertEqual(self.ask("nothing.example", name=b"anything"), ["NOTFOUND "])


class CachedAnswerTests(ServerTestCase):
    """
    C{cached_answer} (the status page's) is the server's answer wherever
    no DNS is needed, and says it does not know where the answer needs MX
    hosts or DANE; C{memoised} shows what the server memoised.
    """

    EXACT = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: mx2.example.com\nmax_age: 86400\n"

    def test_same_as_the_server(self):
        seen = set()
        for domain, text in (("e.example", self.EXACT), ("t.example", TESTING), ("n.example", NONE)):
            self.publish(domain, text, mx=(("elsewhere.example.net", 10),))
            lookup = self.successResultOf(self.cache.get(domain))
            self.assertEqual(lookup.policy, parse_policy(text))
            for settings in (SocketmapSettings(), SocketmapSettings(strict_testing=True),
                             SocketmapSettings(tlsrpt_attributes=True)):
                self.factory = self.make_factory(settings)
                self.proto, self.transport = self.connect()
                expected = cached_answer(domain, lookup, settings)
                self.assertIsNotNone(expected)
                self.assertEqual(self.ask(domain), [expected], (text, settings))
                seen.add(expected)
            self.assertEqual(self.resolver.queries[("MX", domain)], 0)
        self.assertEqual(len(seen), 5)  # enforce with and without attributes, NOTFOUND, strict testing, OK may

    def test_unknown_without_dns(self):
        """A wildcard policy needs the MX hosts, and with C{dane} every TLS level waits for the DANE verdict."""
        self.publish()
        lookup = self.successResultOf(self.cache.get("example.com"))
        self.assertIsNone(cached_answer("example.com", lookup, SocketmapSettings()))
        self.assertTrue(needs_mx_hosts(lookup.policy, SocketmapSettings()))
        exact = Lookup(parse_policy(self.EXACT), lookup.result, True)
        self.assertIsNone(cached_answer("example.com", exact, SocketmapSettings(dane=True)))
        self.assertEqual(cached_answer("example.com", exact, SocketmapSettings()),
                         "OK secure match=mx1.example.com:mx2.example.com servername=hostname")
        # What needs no TLS level is known with dane too.
        testing = Lookup(parse_policy(TESTING), lookup.result, True)
        self.assertEqual(cached_answer("example.com", testing, SocketmapSettings(dane=True)), "NOTFOUND ")
        self.assertEqual(fixed_answer(Lookup(None, lookup.result, True), SocketmapSettings(dane=True)), "NOTFOUND ")

    def test_memoised(self):
        self.publish(mx=(("mx1.example.com", 10), ("b.example.net", 20)))
        lookup = self.successResultOf(self.cache.get("example.com"))
        self.assertIsNone(self.factory.memoised("example.com", lookup))
        [answer] = self.ask("example.com")
        counts = dict(self.factory.counts)
        self.assertEqual(self.factory.memoised("example.com", lookup), (answer, self.clock.seconds() + 300))
        self.assertEqual(self.factory.counts, counts)
        other = Lookup(lookup.policy, lookup.result, True, record_id="2")
        self.assertIsNone(self.factory.memoised("example.com", other))
        self.clock.advance(300)
        self.assertIsNone(self.factory.memoised("example.com", lookup))


class PipeliningTests(ServerTestCase):
    def test_slow_first_answered_in_order(self):
        slow = Deferred()
        self.publish()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        self.send("slow.example", "example.com", b"garbage", "nothing.example")
        self.assertEqual(self.transport.value(), b"")
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.assertEqual(self.answers(), [
            "OK secure match=mx1.example.com servername=hostname",
            "OK secure match=mx1.example.com servername=hostname",
            "PERM request is not 'name key'",
            "NOTFOUND ",
        ])

    def test_slow_mx_lookup_in_order(self):
        self.publish("slow.example", mx=None)
        mx = Deferred()
        self.resolver.mx["slow.example"] = mx
        self.send("slow.example", "nothing.example")
        self.assertEqual(self.transport.value(), b"")
        mx.errback(DNSTemporaryError("timeout", name="slow.example", rdtype="MX"))
        self.assertEqual(self.answers(), [
            "OK secure match=mx1.example.com:.example.net servername=hostname",
            "NOTFOUND ",
        ])

    def test_two_slow_finishing_out_of_order(self):
        first, second = Deferred(), Deferred()
        for domain, d in (("a.example", first), ("b.example", second)):
            self.publish(domain, mx=None)
            self.resolver.txt["_mta-sts." + domain] = d
        self.send("a.example", "b.example", "nothing.example")
        second.errback(DNSTemporaryError("SERVFAIL", name="b", rdtype="TXT"))
        self.assertEqual(self.transport.value(), b"")
        first.errback(DNSTemporaryError("SERVFAIL", name="a", rdtype="TXT"))
        self.assertEqual([a.split(" ")[0] for a in self.answers()], ["TEMP", "TEMP", "NOTFOUND"])

    def test_hot_answer_needs_no_reactor_turn(self):
        self.publish()
        self.ask("example.com")
        self.send("example.com")
        self.assertEqual(self.answers(), ["OK secure match=mx1.example.com servername=hostname"])

    def test_immediate_then_already_fired_deferred(self):
        """An answer that is a fired Deferred still goes out after earlier ones."""
        answers = {b"postfix a": encode_netstring(b"NOTFOUND "), b"postfix b": succeed(encode_netstring(b"OK b"))}
        self.factory.respond = answers.__getitem__
        self.send("a", "b")
        self.assertEqual(self.answers(), ["NOTFOUND ", "OK b"])

    def count_writes(self, transport=None):
        transport = transport or self.transport
        writes = []
        write = transport.write

        def counted(data):
            writes.append(data)
            write(data)

        transport.write = counted
        return writes

    def test_shared_lookup_answers_leave_in_one_write(self):
        """
        Two requests of one read that wait for the same lookup are answered
        in one write when it completes (issue 17 item 8: written one by one,
        the second small segment waited for the client's delayed ACK).
        """
        slow = Deferred()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        writes = self.count_writes()
        self.send("slow.example", "slow.example")
        self.assertEqual(writes, [])
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.assertEqual(len(writes), 1)
        self.assertEqual(self.answers(), ["OK secure match=mx1.example.com servername=hostname"] * 2)

    def test_one_read_answered_in_one_write(self):
        """Immediate answers and answers that wait for lookups, of one read: one write."""
        first, second = Deferred(), Deferred()
        for domain, d in (("a.example", first), ("b.example", second)):
            self.publish(domain, mx=None)
            self.resolver.txt["_mta-sts." + domain] = d
        writes = self.count_writes()
        self.send("nothing.example", "a.example", "[192.0.2.1]", "b.example", "nothing.example")
        self.assertEqual(writes, [])
        first.errback(DNSTemporaryError("SERVFAIL", name="a", rdtype="TXT"))
        self.assertEqual(writes, [])
        second.errback(DNSTemporaryError("SERVFAIL", name="b", rdtype="TXT"))
        self.assertEqual(len(writes), 1)
        self.assertEqual([a.split(" ")[0] for a in self.answers()], ["NOTFOUND", "TEMP", "NOTFOUND", "TEMP", "NOTFOUND"])

    def test_single_request_answered_by_a_fired_deferred(self):
        """The one-request path: a Deferred answer that has already fired goes out at once."""
        answers = {b"postfix a": succeed(encode_netstring(b"OK a")), b"postfix b": encode_netstring(b"NOTFOUND ")}
        self.factory.respond = answers.__getitem__
        self.assertEqual(self.ask("a"), ["OK a"])
        self.assertEqual(self.ask("b"), ["NOTFOUND "])
        self.assertFalse(self.proto.busy)

    def test_connection_lost_while_pending(self):
        slow = Deferred()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        self.send("slow.example")
        self.proto.connectionLost()
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.factory.connections, 0)


class ConnectionTests(ServerTestCase):
    def test_broken_netstring_closes(self):
        self.proto.dataReceived(netstrings(b"postfix nothing.example") + b"x:garbage,")
        self.assertEqual(self.answers(), ["NOTFOUND "])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.factory.counts["broken"], 1)
        self.proto.dataReceived(netstrings(b"postfix nothing.example"))
        self.assertEqual(self.transport.value(), b"")

    def test_broken_netstring_after_pending_request(self):
        slow = Deferred()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        self.proto.dataReceived(netstrings(b"postfix slow.example") + b"5:abc")
        self.proto.dataReceived(b"defgh")
        self.assertFalse(self.transport.disconnecting)
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.assertEqual(self.answers(), ["OK secure match=mx1.example.com servername=hostname"])
        self.assertTrue(self.transport.disconnecting)

    def test_oversized_request_closes(self):
        self.proto.dataReceived(b"10001:")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_request_at_the_limit(self):
        key = b"postfix " + b"a" * 9992
        self.proto.dataReceived(encode_netstring(key))
        [answer] = self.answers()
        self.assertTrue(answer.startswith("PERM "))
        self.assertFalse(self.transport.disconnecting)

    def test_idle_timeout(self):
        self.clock.advance(9)
        self.ask("nothing.example")
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.factory.counts["idle"], 1)

    def test_no_idle_timeout_while_answer_pending(self):
        slow = Deferred()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        self.send("slow.example")
        self.clock.advance(600)
        self.assertFalse(self.transport.disconnecting)
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(60)
        self.assertTrue(self.transport.disconnecting)

    def test_timer_cancelled_on_close(self):
        self.proto.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_max_connections(self):
        """
        At C{max_connections} a new connection is accepted and the oldest
        connection without a lookup in flight is closed to make room (issue
        17 item 9: held connections used to shut out every new client).
        """
        factory = self.make_factory(SocketmapSettings(max_connections=2, idle_timeout=None))
        first, first_transport = self.connect(factory)
        second, second_transport = self.connect(factory)
        third, _ = self.connect(factory)
        self.assertIsNotNone(third)
        self.assertTrue(first_transport.disconnected)  # aborted
        self.assertFalse(second_transport.disconnecting)
        self.assertEqual((factory.counts["evicted"], factory.counts["refused"]), (1, 0))
        self.assertEqual(factory.connections, 3)  # until the aborted one is gone
        first.connectionLost()
        self.assertEqual(factory.connections, 2)

    def test_first_request_timeout(self):
        """
        A connection that has not sent a complete request is closed after
        C{first_request_timeout} (10 s); one that has, after C{idle_timeout}
        without requests.
        """
        factory = self.make_factory(SocketmapSettings(idle_timeout=300.0))
        self.assertEqual(factory.settings.first_request_timeout, 10.0)
        _, silent = self.connect(factory)
        trickling, trickle = self.connect(factory)
        active, active_transport = self.connect(factory)
        self.clock.advance(5)
        active.dataReceived(netstrings(b"postfix nothing.example"))
        trickling.dataReceived(b"23:postfix")  # part of a request is not a request
        self.clock.advance(4.9)
        self.assertEqual(factory.counts["idle"], 0)
        self.clock.advance(0.1)
        self.assertTrue(silent.disconnected)
        self.assertTrue(trickle.disconnected)
        self.assertFalse(active_transport.disconnecting)
        self.assertEqual(factory.counts["idle"], 2)
        self.clock.advance(294.9)  # 299.9 s after its request
        self.assertFalse(active_transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(active_transport.disconnecting)
        self.assertEqual(factory.counts["idle"], 3)

    def test_shorter_idle_timeout_applies_before_the_first_request(self):
        factory = self.make_factory(SocketmapSettings(idle_timeout=3.0, first_request_timeout=10.0))
        _, transport = self.connect(factory)
        self.clock.advance(3)
        self.assertTrue(transport.disconnected)

    def test_first_request_timeout_without_idle_timeout(self):
        factory = self.make_factory(SocketmapSettings(idle_timeout=None))
        _, silent = self.connect(factory)
        active, active_transport = self.connect(factory)
        active.dataReceived(netstrings(b"postfix nothing.example"))
        self.clock.advance(10)
        self.assertTrue(silent.disconnected)
        self.assertFalse(active_transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer for an active connection
        self.clock.advance(1000)
        self.assertFalse(active_transport.disconnecting)

    def test_per_client_cap(self):
        """
        C{max_connections_per_client}: a client address over its cap loses
        its own oldest idle connection; other clients are not touched.
        """
        factory = self.make_factory(SocketmapSettings(max_connections_per_client=2, idle_timeout=None))
        hog = [self.connect(factory, "127.0.0.2") for _ in range(2)]
        postfix, postfix_transport = self.connect(factory, "127.0.0.1")
        newest, _ = self.connect(factory, "127.0.0.2")
        self.assertIsNotNone(newest)
        self.assertTrue(hog[0][1].disconnected)
        self.assertFalse(hog[1][1].disconnecting)
        self.assertFalse(postfix_transport.disconnecting)
        self.assertEqual(factory.counts["evicted"], 1)
        hog[0][0].connectionLost()
        self.assertEqual(factory.connections, 3)
        # The other client is under its own cap.
        self.assertIsNotNone(self.connect(factory, "127.0.0.1")[0])
        self.assertEqual(factory.counts["evicted"], 1)

    def test_a_connection_that_never_asked_goes_first(self):
        """At a cap, connections without a request go before active ones, oldest first."""
        factory = self.make_factory(SocketmapSettings(max_connections=3, idle_timeout=None))
        active, active_transport = self.connect(factory)
        active.dataReceived(netstrings(b"postfix nothing.example"))
        _, older_fresh = self.connect(factory)
        _, newer_fresh = self.connect(factory)
        newcomer, _ = self.connect(factory)
        self.assertTrue(older_fresh.disconnected)
        self.assertFalse(newer_fresh.disconnecting)
        self.assertFalse(active_transport.disconnecting)
        newcomer.dataReceived(netstrings(b"postfix nothing.example"))
        self.connect(factory)
        self.assertTrue(newer_fresh.disconnected)
        self.assertFalse(active_transport.disconnecting)
        self.assertEqual(factory.counts["evicted"], 2)

    def test_connections_waiting_for_a_lookup_are_not_closed(self):
        slow = Deferred()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        factory = self.make_factory(SocketmapSettings(max_connections=2, idle_timeout=None))
        waiting = [self.connect(factory) for _ in range(2)]
        for proto, _ in waiting:
            proto.dataReceived(netstrings(b"postfix slow.example"))
        self.assertIsNone(factory.buildProtocol(None))
        self.assertEqual((factory.counts["evicted"], factory.counts["refused"]), (0, 1))
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.assertIsNotNone(self.connect(factory)[0])
        self.assertTrue(waiting[0][1].disconnected)
        self.assertEqual(factory.counts["evicted"], 1)

    def test_a_connection_closing_already_is_not_chosen(self):
        """A connection aborted by its idle timer (gone on the next reactor turn) does not make room twice."""
        factory = self.make_factory(SocketmapSettings(max_connections=2, idle_timeout=None))
        _, timed_out = self.connect(factory)
        self.clock.advance(5)
        _, younger = self.connect(factory)
        self.clock.advance(5)  # the first one's first-request timeout
        self.assertTrue(timed_out.disconnected)
        self.assertIsNotNone(self.connect(factory)[0])
        self.assertTrue(younger.disconnected)
        self.assertEqual((factory.counts["idle"], factory.counts["evicted"]), (1, 1))

    def test_evictions_closing_at_once_are_bounded(self):
        """Sockets still closing count: at most EVICTING more than max_connections are open."""
        factory = self.make_factory(SocketmapSettings(max_connections=2, idle_timeout=None))
        for _ in range(2 + socketmap_server.EVICTING + 5):
            self.connect(factory)
        self.assertEqual(factory.counts["evicted"], socketmap_server.EVICTING)
        self.assertEqual(factory.counts["refused"], 5)
        self.assertEqual(factory.connections, 2 + socketmap_server.EVICTING)


class BoundedTransport(StringTransport):
    """
    A L{StringTransport} that treats its producer as a socket transport
    does: C{pauseProducing} when more than C{bound} bytes wait to be sent,
    C{resumeProducing} once L{drain} has sent them all.
    """

    def __init__(self, bound):
        super().__init__()
        self.bound = bound
        self.sent = 0
        self.paused = False
        self.peak = 0

    def unsent(self):
        return len(self.value()) - self.sent

    def write(self, data):
        super().write(data)
        self.peak = max(self.peak, self.unsent())
        if self.producer is not None and not self.paused and self.unsent() > self.bound:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self):
        self.sent = len(self.value())
        if self.paused:
            self.paused = False
            if self.producer is not None:
                self.producer.resumeProducing()


class BackpressureTests(ServerTestCase):
    """
    Issue 17 item 2: answers a client does not read are bounded; reading
    stops while they wait and resumes when they have gone out.
    """

    def setUp(self):
        super().setUp()
        self.publish()
        self.proto.connectionLost()  # the StringTransport one of ServerTestCase
        self.bounded = BoundedTransport(1000)
        self.proto, self.transport = self.connect(transport=self.bounded)

    def decode(self):
        return [a.decode() for a in NetstringDecoder(MAX_REPLY).feed(self.bounded.value())]

    def test_registered_as_streaming_producer(self):
        self.assertIs(self.bounded.producer, self.proto)
        self.assertTrue(self.bounded.streaming)

    def test_reading_stops_while_answers_wait(self):
        requests = 1000
        self.proto.dataReceived(netstrings(*[b"postfix example.com"] * requests))
        # The transport's bound was passed: reading stopped, the rest is held.
        self.assertEqual(self.bounded.producerState, "paused")
        answered = len(self.decode())
        self.assertLess(answered, requests // 2)
        # Answers are written in chunks: the transport holds at most its bound and one chunk.
        self.assertLessEqual(self.bounded.peak, 1000 + socketmap_protocol.WRITE_CHUNK + 55)
        self.assertEqual(self.proto.held_bytes, (requests - answered) * len(b"postfix example.com"))
        # More input while paused (a TLS wrapper may still deliver some) is held in order too.
        self.proto.dataReceived(netstrings(b"postfix [192.0.2.1]"))
        rounds = 0
        while self.bounded.producerState == "paused":
            rounds += 1
            self.bounded.drain()
        self.assertGreaterEqual(rounds, requests * 55 // socketmap_protocol.WRITE_CHUNK)
        answers = self.decode()
        self.assertEqual(answers, ["OK secure match=mx1.example.com servername=hostname"] * requests + ["NOTFOUND "])
        self.assertEqual(self.proto.held_bytes, 0)
        self.assertEqual(self.factory.counts["ok"], requests)

    def test_requests_arriving_while_paused_wait(self):
        """Requests a transport still delivers after the pause are held, then answered in order."""
        self.proto.dataReceived(netstrings(*[b"postfix example.com"] * 30))  # 1650 answer bytes > 1000
        self.assertEqual(self.bounded.producerState, "paused")
        self.assertEqual(self.proto.held_bytes, 0)
        self.proto.dataReceived(netstrings(b"postfix [192.0.2.1]"))
        self.assertEqual(len(self.decode()), 30)
        self.assertEqual(self.proto.held_bytes, len(b"postfix [192.0.2.1]"))
        self.bounded.drain()
        self.assertEqual(self.decode()[30:], ["NOTFOUND "])
        self.assertEqual(self.bounded.producerState, "producing")

    def test_pipeline_bound_on_waiting_lookups(self):
        """At most C{max_pipeline} answers wait for lookups; then reading stops until they go out."""
        slow = Deferred()
        self.publish("slow.example")
        self.fetcher.policies["slow.example"] = slow
        limit = self.factory.settings.max_pipeline
        self.proto.dataReceived(netstrings(*[b"postfix slow.example"] * (limit + 10)))
        self.assertEqual(self.bounded.producerState, "paused")
        self.assertEqual(self.fetcher.fetches["slow.example"], 1)
        self.assertEqual(self.proto.held_bytes, 10 * len(b"postfix slow.example"))
        slow.callback(FetchedPolicy(policy=parse_policy(ENFORCE), text=ENFORCE))
        self.bounded.drain()
        self.assertEqual(self.bounded.producerState, "producing")
        self.assertEqual(len(self.decode()), limit + 10)
        self.assertEqual(self.proto.held_bytes, 0)

    def test_idle_timeout_aborts_a_client_that_does_not_read(self):
        """
        loseConnection would wait for the unsent answers for ever: a client
        that does not read is aborted at the idle timeout.
        """
        self.proto.dataReceived(netstrings(*[b"postfix example.com"] * 100))
        self.assertEqual(self.bounded.producerState, "paused")
        self.clock.advance(60)
        self.assertTrue(self.bounded.disconnected)  # StringTransport.abortConnection
        self.assertEqual(self.factory.counts["idle"], 1)

    def test_broken_netstring_after_held_requests(self):
        """The requests before a broken netstring are answered once they can go out, then the connection closes."""
        self.proto.dataReceived(netstrings(*[b"postfix example.com"] * 1000) + b"x:")
        self.assertFalse(self.bounded.disconnecting)
        while self.bounded.paused:
            self.bounded.drain()
        self.assertEqual(len(self.decode()), 1000)
        self.assertTrue(self.bounded.disconnecting)
        self.assertIsNone(self.bounded.producer)  # unregistered, so the close is not held up


class ImmediateWriterTests(SynchronousTestCase):
    def setUp(self):
        self.transport = StringTransport()
        self.sent = []

    def send_all(self, data):
        self.sent.append(data)
        return len(data)

    def test_whole_writes_go_to_the_socket(self):
        writer = ImmediateWriter(self.transport, self.send_all)
        writer.write(b"one")
        writer.write(b"two")
        self.assertEqual(self.sent, [b"one", b"two"])
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(writer.direct)

    def test_partial_send_hands_the_rest_and_later_writes_to_the_transport(self):
        def send_some(data):
            self.sent.append(data[:2])
            return 2

        writer = ImmediateWriter(self.transport, send_some)
        writer.write(b"abcdef")
        writer.write(b"ghi")
        self.assertEqual(self.sent, [b"ab"])
        self.assertEqual(self.transport.value(), b"cdefghi")  # in order, nothing lost
        self.assertFalse(writer.direct)

    def test_send_error_hands_everything_to_the_transport(self):
        for error in (BlockingIOError(), ConnectionResetError()):
            transport = StringTransport()

            def refuse(data, error=error):
                raise error

            writer = ImmediateWriter(transport, refuse)
            writer.write(b"abc")
            writer.write(b"def")
            self.assertEqual(transport.value(), b"abcdef")
            self.assertFalse(writer.direct)

    def test_other_transports_are_written_normally(self):
        writer = ImmediateWriter(self.transport)
        self.assertFalse(writer.direct)
        writer.write(b"abc")
        self.assertEqual(self.transport.value(), b"abc")


# --- over loopback TCP ------------------------------------------------------------------


class Client(Protocol):
    def __init__(self):
        self.decoder = NetstringDecoder(MAX_REPLY)
        self.received = []
        self.waiting = None
        self.made = Deferred()
        self.closed = Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.received.extend(f.decode() for f in self.decoder.feed(data))
        if self.waiting and len(self.received) >= self.waiting[0]:
            _, d = self.waiting
            self.waiting = None
            d.callback(self.received)

    def wait_for(self, count):
        d = Deferred()
        self.waiting = (count, d)
        return d

    def connectionLost(self, reason):
        self.closed.callback(None)


class LoopbackTests(TestCase):
    timeout = 10

    def setUp(self):
        self.resolver = FakeResolver()
        self.fetcher = FakeFetcher()
        self.cache = PolicyCache(MemoryStore(), self.resolver, self.fetcher, reactor)
        self.factory = SocketmapFactory(self.cache, self.resolver, reactor, SocketmapSettings(idle_timeout=None))
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        self.fetcher.policies["example.com"] = ENFORCE
        self.resolver.mx["example.com"] = [(10, "mx1.example.com"), (20, "mx.sub.example.net")]

    async def connect(self):
        client = Client()
        factory = ClientFactory.forProtocol(lambda: client)
        factory.clientConnectionFailed = lambda c, r: client.made.errback(r)
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory)
        await client.made

        async def close():
            if client.transport.connected:
                client.transport.loseConnection()
            await client.closed
            for _ in range(100):  # the server's side of the connection goes too
                if self.factory.connections == 0:
                    break
                await deferLater(reactor, 0.01)

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return client

    async def test_pipelined(self):
        slow = Deferred()
        self.resolver.txt["_mta-sts.slow.example"] = ["v=STSv1; id=1"]
        self.fetcher.policies["slow.example"] = slow
        client = await self.connect()
        answers = client.wait_for(4)
        client.transport.write(netstrings(b"postfix slow.example", b"postfix example.com", b"junk",
                                          b"postfix [192.0.2.1]"))
        reactor.callLater(0.05, slow.callback, FetchedPolicy(policy=parse_policy(WILDCARD_ONLY), text=WILDCARD_ONLY))
        self.assertEqual(await answers, [
            "TEMP no MX host of slow.example matches its MTA-STS policy",
            "OK secure match=mx1.example.com servername=hostname",
            "PERM request is not 'name key'",
            "NOTFOUND ",
        ])
        again = client.wait_for(5)
        client.transport.write(netstrings(b"postfix example.com"))
        self.assertEqual((await again)[-1], "OK secure match=mx1.example.com servername=hostname")

    async def test_answer_leaves_without_a_reactor_turn(self):
        built = []
        build = self.factory.buildProtocol

        def record(addr):
            built.append(build(addr))
            return built[-1]

        self.factory.buildProtocol = record
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        self.addCleanup(sock.close)
        for _ in range(500):
            if built:
                break
            await deferLater(reactor, 0.01)
        [proto] = built
        proto.dataReceived(netstrings(b"postfix example.com"))  # warms the cache
        sock.settimeout(5)
        self.assertEqual(sock.recv(4096), netstrings(b"OK secure match=mx1.example.com servername=hostname"))
        sock.setblocking(False)
        proto.dataReceived(netstrings(b"postfix [192.0.2.1]"))
        # No reactor turn in between: the answer is already in the kernel.
        self.assertEqual(sock.recv(4096), netstrings(b"NOTFOUND "))

    async def test_accepted_socket_has_tcp_nodelay(self):
        """
        Issue 17 item 8: Nagle held back a second small answer until the
        client's delayed ACK (44 ms); accepted sockets have TCP_NODELAY.
        """
        built = []
        build = self.factory.buildProtocol
        self.factory.buildProtocol = lambda addr: built.append(build(addr)) or built[-1]
        client = await self.connect()
        answers = client.wait_for(1)
        client.transport.write(netstrings(b"postfix example.com"))
        await answers
        [proto] = built
        handle = proto.transport.getHandle()
        self.assertNotEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)

    async def test_broken_netstring_closes(self):
        client = await self.connect()
        client.transport.write(netstrings(b"postfix example.com") + b"1:ab")
        await client.closed
        self.assertEqual(client.received, ["OK secure match=mx1.example.com servername=hostname"])


# --- reading an already-fired Deferred ----------------------------------------------


class ResultNowTests(SynchronousTestCase):
    """
    L{result_now} gives what a callback added now would get at once, and
    leaves the L{Deferred} as the public API would: a value stays, a failure
    is consumed, an unfired Deferred is untouched.
    """

    def test_value(self):
        d = succeed("v")
        self.assertEqual(result_now(d), "v")
        # The value stays, as after "await d": a later callback receives it.
        self.assertEqual(self.successResultOf(d), "v")

    def test_failure_is_returned_and_consumed(self):
        d = fail(ValueError("boom"))
        failure = result_now(d)
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(failure.value, ValueError)
        # Consumed: the Deferred goes on with None ...
        self.assertIsNone(self.successResultOf(d))
        # ... and nothing is logged as an unhandled error when it is collected.
        del d
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    def test_unconsumed_failure_is_logged(self):
        """The check above can fail: a dropped failed Deferred is logged."""
        d = fail(ValueError("boom"))
        del d
        gc.collect()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_unfired_is_untouched(self):
        d: Deferred[str] = Deferred()
        self.assertIs(result_now(d), PENDING)
        d.callback("later")
        self.assertEqual(self.successResultOf(d), "later")
        e: Deferred[str] = Deferred()
        self.assertIs(result_now(e), PENDING)
        e.errback(ValueError("later"))
        self.failureResultOf(e, ValueError)

    def test_waiting_on_another_deferred(self):
        inner: Deferred[str] = Deferred()
        d = succeed("first").addCallback(lambda _: inner)
        self.assertIs(result_now(d), PENDING)
        inner.callback("inner")
        self.assertEqual(result_now(d), "inner")
        self.assertEqual(self.successResultOf(d), "inner")

    def test_paused(self):
        d = succeed("v")
        d.pause()
        self.assertIs(result_now(d), PENDING)
        d.unpause()
        self.assertEqual(result_now(d), "v")

    def test_agrees_with_add_both(self):
        """For every state, the same answer as the public API (a callback added now)."""
        makers = [
            lambda: succeed(1),
            lambda: succeed(None),
            lambda: fail(KeyError("k")),
            lambda: Deferred(),
            lambda: succeed(0).addCallback(lambda _: Deferred()),
            lambda: succeed(0).addCallback(lambda _: succeed(2)),
        ]
        for make in makers:
            seen: list = []
            make().addBoth(seen.append)
            now = result_now(make())
            if not seen:
                self.assertIs(now, PENDING)
            elif isinstance(seen[0], Failure):
                self.assertIsInstance(now, Failure)
                self.assertIs(now.type, seen[0].type)
            else:
                self.assertEqual(now, seen[0])

    def test_store_errors_are_one_line(self):
        """A store error is TEMP with one log line and no traceback (shutdown: info)."""
        from twisted.logger import LogLevel, globalLogPublisher

        from mtasts_twisted.store import StoreError

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        resolver = FakeResolver()
        cache = PolicyCache(MemoryStore(), resolver, FakeFetcher(), Clock())
        factory = SocketmapFactory(cache, resolver, Clock(), SocketmapSettings(idle_timeout=None))
        expected = encode_netstring(b"TEMP MTA-STS policy of example.com unavailable (internal-error)")
        for reason, level in (("database-locked", LogLevel.error), ("store-closed", LogLevel.info)):
            del events[:]
            cache.get = lambda domain, reason=reason: fail(StoreError("sqlite:/x: " + reason, reason=reason))
            self.assertEqual(factory.respond(b"postfix example.com"), expected)
            [event] = [e for e in events if "example.com" in str(e.get("domain", ""))]
            self.assertIs(event["log_level"], level)
            self.assertNotIn("log_failure", event)
        self.assertEqual(self.flushLoggedErrors(StoreError), [])

    def test_hot_cache_answer_adds_no_callback(self):
        """The server reads a fired lookup without a callback, and consumes a failure."""
        clock = Clock()
        resolver = FakeResolver()
        fetcher = FakeFetcher()
        resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1"]
        fetcher.policies["example.com"] = ENFORCE
        resolver.mx["example.com"] = [(10, "mx1.example.com")]
        cache = PolicyCache(MemoryStore(), resolver, fetcher, clock)
        factory = SocketmapFactory(cache, resolver, clock, SocketmapSettings(idle_timeout=None))
        self.assertIsInstance(factory.respond(b"postfix example.com"), bytes)
        fired = []
        get = cache.get

        def watched(domain):
            d = get(domain)
            fired.append(d)
            return d

        cache.get = watched
        self.assertEqual(
            factory.respond(b"postfix example.com"),
            encode_netstring(b"OK secure match=mx1.example.com servername=hostname"),
        )
        [d] = fired
        self.assertIs(self.successResultOf(d).policy.mode, Mode.ENFORCE)
        cache.get = lambda domain: fail(ValueError("broken cache"))
        self.assertEqual(factory.respond(b"postfix example.com"),
                         encode_netstring(b"TEMP MTA-STS policy of example.com unavailable (internal-error)"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # logged once, by the server
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(ValueError), [])
