"""
Tests for L{mtasts_twisted.dns.records}: the C{_mta-sts} (RFC 8461 §3.1) and
C{_smtp._tls} (RFC 8460 §3) TXT discoveries, over the in-memory
L{FakeResolver} and over a L{DNSResolver} talking to the loopback test
server.
"""

from __future__ import annotations

from typing import Any, Coroutine

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from mtasts_twisted.dns import (
    DNSNoRecordError,
    DNSResolver,
    DNSTemporaryError,
    lookup_sts_answer,
    lookup_sts_record,
    lookup_tlsrpt_record,
)
from mtasts_twisted.dns.records import _select_sts_record
from mtasts_twisted.policy import (
    DomainError,
    MultipleRecordsError,
    NoRecordError,
    RecordSyntaxError,
    STSRecord,
    TLSRPTRecord,
    select_tlsrpt_record,
)
from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.memory import FakeResolver

RUA = "mailto:tlsrpt@example.net"


def _run(coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


class LookupTLSRPTRecordTests(unittest.SynchronousTestCase):
    """L{lookup_tlsrpt_record} over an L{IDNSResolver} that answers at once."""

    def setUp(self) -> None:
        self.resolver = FakeResolver()

    def test_record(self) -> None:
        """The one TLSRPT record among the TXT of C{_smtp._tls.<domain>}."""
        self.resolver.txt["_smtp._tls.example.net"] = ["v=spf1 -all", f"v=TLSRPTv1; rua={RUA}"]
        record = self.successResultOf(_run(lookup_tlsrpt_record(self.resolver, "example.net")))
        self.assertEqual(record, TLSRPTRecord(rua=(RUA,)))
        self.assertEqual(dict(self.resolver.queries), {("TXT", "_smtp._tls.example.net"): 1})

    def test_no_txt(self) -> None:
        """No TXT at all: the resolver's L{DNSNoRecordError}, not L{NoRecordError}."""
        failure = self.failureResultOf(_run(lookup_tlsrpt_record(self.resolver, "example.net")))
        self.assertIs(failure.type, DNSNoRecordError)
        self.assertEqual(failure.value.reason, "dns-no-record")

    def test_temporary(self) -> None:
        error = DNSTemporaryError("SERVFAIL", "_smtp._tls.example.net", "TXT")
        self.resolver.txt["_smtp._tls.example.net"] = error
        failure = self.failureResultOf(_run(lookup_tlsrpt_record(self.resolver, "example.net")))
        self.assertIs(failure.value, error)

    def test_no_tlsrpt_record(self) -> None:
        """TXT records, none of them TLSRPT: L{NoRecordError} (RFC 8460 §3)."""
        self.resolver.txt["_smtp._tls.example.net"] = ["v=spf1 -all", "v=STSv1; id=1"]
        failure = self.failureResultOf(_run(lookup_tlsrpt_record(self.resolver, "example.net")))
        self.assertIs(failure.type, NoRecordError)

    def test_multiple(self) -> None:
        """RFC 8460 §3: more than one record: the domain does not do TLSRPT."""
        self.resolver.txt["_smtp._tls.example.net"] = [f"v=TLSRPTv1; rua={RUA}", "v=TLSRPTv1; rua=https://r.example/"]
        failure = self.failureResultOf(_run(lookup_tlsrpt_record(self.resolver, "example.net")))
        self.assertIs(failure.type, MultipleRecordsError)
        self.assertEqual(failure.value.reason, "multiple-tlsrpt-records")

    def test_malformed(self) -> None:
        self.resolver.txt["_smtp._tls.example.net"] = ["v=TLSRPTv1; rua=not a uri"]
        failure = self.failureResultOf(_run(lookup_tlsrpt_record(self.resolver, "example.net")))
        self.assertIs(failure.type, RecordSyntaxError)

    def test_as_select_tlsrpt_record(self) -> None:
        """The outcome is C{select_tlsrpt_record} of the TXT strings, whatever they are."""
        cases: list[list[str]] = [
            [f"v=TLSRPTv1; rua={RUA}"],
            [f"v=TLSRPTv1;rua={RUA},https://r.example/x; ext=1"],
            [f"v=TLSRPTv1; rua={RUA}", "v=TLSRPTv1; rua=bad"],
            ["v=TLSRPTv1;"],
            [],
            ["other"],
        ]
        for strings in cases:
            self.resolver.txt["_smtp._tls.example.net"] = strings
            outcome = _run(lookup_tlsrpt_record(self.resolver, "example.net"))
            try:
                expected: Any = select_tlsrpt_record(strings)
            except Exception as e:
                self.assertEqual(self.failureResultOf(outcome).type, type(e), strings)
            else:
                self.assertEqual(self.successResultOf(outcome), expected, strings)


class LookupSTSRecordTests(unittest.SynchronousTestCase):
    """L{lookup_sts_record} and L{lookup_sts_answer} over an L{IDNSResolver} that answers at once."""

    def setUp(self) -> None:
        self.resolver = FakeResolver(ttl=120)

    def test_record_and_ttl(self) -> None:
        self.resolver.txt["_mta-sts.example.com"] = ["v=spf1 -all", "v=STSv1; id=20240101"]
        answer = self.successResultOf(_run(lookup_sts_answer(self.resolver, "example.com")))
        self.assertEqual(answer, (STSRecord(id="20240101"), 120))
        record = self.successResultOf(_run(lookup_sts_record(self.resolver, "example.com")))
        self.assertEqual(record, STSRecord(id="20240101"))
        self.assertEqual(dict(self.resolver.queries), {("TXT", "_mta-sts.example.com"): 2})

    def test_no_txt(self) -> None:
        """RFC 8461 §3.1: no TXT record is no policy: L{NoRecordError}, caused by the DNS answer."""
        failure = self.failureResultOf(_run(lookup_sts_record(self.resolver, "example.com")))
        self.assertIs(failure.type, NoRecordError)
        self.assertIn("_mta-sts.example.com", str(failure.value))
        self.assertIsInstance(failure.value.__cause__, DNSNoRecordError)

    def test_temporary(self) -> None:
        error = DNSTemporaryError("timeout", "_mta-sts.example.com", "TXT")
        self.resolver.txt["_mta-sts.example.com"] = error
        failure = self.failureResultOf(_run(lookup_sts_record(self.resolver, "example.com")))
        self.assertIs(failure.value, error)

    def test_not_sts(self) -> None:
        self.resolver.txt["_mta-sts.example.com"] = ["v=spf1 -all"]
        self.failureResultOf(_run(lookup_sts_record(self.resolver, "example.com")), NoRecordError)

    def test_multiple(self) -> None:
        self.resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=1", "v=STSv1; id=2"]
        failure = self.failureResultOf(_run(lookup_sts_record(self.resolver, "example.com")), MultipleRecordsError)
        self.assertEqual(failure.value.reason, "multiple-mta-sts-records")

    def test_malformed(self) -> None:
        self.resolver.txt["_mta-sts.example.com"] = ["v=STSv1; id=not-an-id!"]
        self.failureResultOf(_run(lookup_sts_record(self.resolver, "example.com")), RecordSyntaxError)

    def test_selection_memoised(self) -> None:
        """The same TXT strings are parsed once: a cached answer costs no parse."""
        strings = ("v=STSv1; id=memo1",)
        self.assertIs(_select_sts_record(strings), _select_sts_record(tuple(list(strings))))


class OverDNSTests(unittest.TestCase):
    """Both discoveries through a L{DNSResolver} and the loopback test server."""

    def setUp(self) -> None:
        self.server = DNSTestServer()
        self.server.start(reactor)
        self.addCleanup(self.server.stop)
        self.resolver = DNSResolver(reactor, [self.server.nameserver], timeout=0.2, budget=2.0, attempts=1)

    async def test_tlsrpt_strings_joined(self) -> None:
        """The character-strings of one TXT RR are joined before parsing."""
        self.server.add_txt("_smtp._tls.example.net", "v=TLSRPTv1;", f"rua={RUA}")
        record = await lookup_tlsrpt_record(self.resolver, "example.net")
        self.assertEqual(record.rua, (RUA,))
        self.assertEqual(self.server.count("_smtp._tls.example.net", "TXT"), 1)

    async def test_tlsrpt_nxdomain(self) -> None:
        with self.assertRaises(DNSNoRecordError) as caught:
            await lookup_tlsrpt_record(self.resolver, "example.net")
        self.assertTrue(caught.exception.nxdomain)

    async def test_tlsrpt_bad_domain(self) -> None:
        with self.assertRaises(DomainError):
            await lookup_tlsrpt_record(self.resolver, "exa mple..net")

    async def test_sts_through_cname(self) -> None:
        self.server.add_cname("_mta-sts.example.com", "_mta-sts.policy.example.org")
        self.server.add_txt("_mta-sts.policy.example.org", "v=STSv1; id=abc", ttl=90)
        record, ttl = await lookup_sts_answer(self.resolver, "example.com")
        self.assertEqual(record, STSRecord(id="abc"))
        self.assertEqual(ttl, 90)
