"""
Tests for L{mtasts_twisted.delivery.plan} (the MX order and the MTA-STS
decision per MX host) and L{mtasts_twisted.delivery.accounting} (the TLSRPT
result of a skipped host or of one session): pure functions, no sockets,
no reactor.
"""

from __future__ import annotations

import random
from collections.abc import MutableSequence
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import crypto
from twisted.trial import unittest

from mtasts_twisted.dane import DANEState, DANEStatus, discover_dane
from mtasts_twisted.delivery import (
    DeliveryPlan,
    HostAction,
    PlannedHost,
    plan_attempts,
    plan_host,
)
from mtasts_twisted.delivery.accounting import session_result, skip_result
from mtasts_twisted.delivery.plan import DANE_LOOKUP_FAILED_REASON
from mtasts_twisted.dns import DNSTemporaryError, MXHost, TLSARecord
from mtasts_twisted.pkix import dane_name_matches, dane_verify, tlsa_association_data
from mtasts_twisted.policy import Mode, Policy, parse_policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.delivery.details import MX_MISMATCH_REASON, starttls_not_supported_details
from mtasts_twisted.testing.memory import FakeResolver
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.tls import VerifyMode

DOMAIN = "example.com"
MX1 = MXHost(10, "mx1.example.com")
MX2 = MXHost(20, "mx2.example.com")
EVIL = MXHost(5, "mx.evil.example")


def policy(mode: str, *mx: str) -> Policy:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx or ("*.example.com",)]
    return parse_policy("\n".join(lines + ["max_age: 86400"]) + "\n")


class NoShuffle:
    """An rng that leaves every group in its sorted order, and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def shuffle(self, x: MutableSequence[Any]) -> None:
        self.calls += 1


class Reverse:
    """An rng that reverses every group."""

    def shuffle(self, x: MutableSequence[Any]) -> None:
        x.reverse()


class PlanHostTests(unittest.SynchronousTestCase):
    """L{plan_host}: the decision for one MX host, per policy mode."""

    def test_enforce_listed(self) -> None:
        """Enforce, a listed host: verified TLS required, nothing to report yet."""
        target = plan_host(policy("enforce"), MX1)
        self.assertEqual(
            target,
            PlannedHost(
                host=MX1.host,
                preference=10,
                action=HostAction.REQUIRE_VERIFIED_TLS,
                verify=VerifyMode.VERIFY,
                require_tls=True,
                matches_policy=True,
                skip_reason=None,
            ),
        )

    def test_enforce_wildcard(self) -> None:
        """A C{*.} pattern matches one leftmost label (RFC 8461 §4.1)."""
        self.assertIs(plan_host(policy("enforce", "*.example.com"), MX1).action, HostAction.REQUIRE_VERIFIED_TLS)
        deep = MXHost(10, "a.mx1.example.com")
        self.assertIs(plan_host(policy("enforce", "*.example.com"), deep).action, HostAction.SKIP)

    def test_enforce_unlisted(self) -> None:
        """
        Enforce, an unlisted host: skipped (RFC 8461 §4.1), with the
        mismatch failure to report, without receiving-ip.
        """
        target = plan_host(policy("enforce", MX1.host), EVIL)
        self.assertIs(target.action, HostAction.SKIP)
        self.assertIs(target.verify, VerifyMode.VERIFY)
        self.assertTrue(target.require_tls)
        self.assertFalse(target.matches_policy)
        self.assertEqual(
            target.skip_reason,
            FailureDetails(
                ResultType.VALIDATION_FAILURE,
                receiving_mx_hostname=EVIL.host,
                failure_reason_code=MX_MISMATCH_REASON,
            ),
        )

    def test_testing(self) -> None:
        """Testing: record-only for every host, listed or not; never skipped."""
        listed = plan_host(policy("testing", MX1.host), MX1)
        unlisted = plan_host(policy("testing", MX1.host), EVIL)
        for target in (listed, unlisted):
            self.assertIs(target.action, HostAction.RECORD_ONLY)
            self.assertIs(target.verify, VerifyMode.RECORD_ONLY)
            self.assertFalse(target.require_tls)
            self.assertIsNone(target.skip_reason)
        self.assertTrue(listed.matches_policy)
        self.assertFalse(unlisted.matches_policy)

    def test_mode_none(self) -> None:
        """Mode none: opportunistic, whatever the mx patterns."""
        target = plan_host(policy("none", MX1.host), EVIL)
        self.assertEqual(
            target,
            PlannedHost(EVIL.host, 5, HostAction.OPPORTUNISTIC, VerifyMode.RECORD_ONLY, False, True),
        )

    def test_no_policy(self) -> None:
        """No policy: opportunistic."""
        target = plan_host(None, MX1)
        self.assertEqual(
            target,
            PlannedHost(MX1.host, 10, HostAction.OPPORTUNISTIC, VerifyMode.RECORD_ONLY, False, True),
        )

    def test_frozen(self) -> None:
        """A L{PlannedHost} is a frozen value."""
        target = plan_host(None, MX1)
        self.assertRaises(AttributeError, setattr, target, "require_tls", True)
        self.assertEqual(hash(target), hash(plan_host(None, MX1)))


class PlanAttemptsTests(unittest.SynchronousTestCase):
    """L{plan_attempts}: the hosts in order, each decided."""

    def test_order_and_decisions(self) -> None:
        """By preference, each with L{plan_host}'s decision."""
        enforce = policy("enforce", "*.example.com")
        targets = plan_attempts(enforce, [MX2, MX1, EVIL], rng=NoShuffle())
        self.assertEqual([t.host for t in targets], [EVIL.host, MX1.host, MX2.host])
        self.assertEqual(targets, tuple(plan_host(enforce, mx) for mx in (EVIL, MX1, MX2)))
        self.assertEqual(
            [t.action for t in targets],
            [HostAction.SKIP, HostAction.REQUIRE_VERIFIED_TLS, HostAction.REQUIRE_VERIFIED_TLS],
        )

    def test_shuffle_within_preference(self) -> None:
        """Hosts of equal preference are shuffled (RFC 5321 §5.1), others not."""
        hosts = [MXHost(10, "a"), MXHost(10, "b"), MXHost(10, "c"), MXHost(5, "z"), MXHost(20, "y")]
        targets = plan_attempts(None, hosts, rng=Reverse())
        self.assertEqual([t.host for t in targets], ["z", "c", "b", "a", "y"])
        orders = {tuple(t.host for t in plan_attempts(None, hosts, rng=random.Random(seed))) for seed in range(20)}
        self.assertGreater(len(orders), 1)
        for order in orders:
            self.assertEqual((order[0], order[-1]), ("z", "y"))

    def test_rng_called_per_group(self) -> None:
        """The rng shuffles each preference group (once each)."""
        rng = NoShuffle()
        plan_attempts(None, [MX1, MX2, MXHost(10, "mx3.example.com")], rng=rng)
        self.assertEqual(rng.calls, 2)

    def test_max_hosts_counts_skipped(self) -> None:
        """C{max_hosts} keeps the first hosts in order, skipped ones included."""
        targets = plan_attempts(policy("enforce", MX1.host, MX2.host), [MX1, MX2, EVIL], rng=NoShuffle(), max_hosts=2)
        self.assertEqual([(t.host, t.action) for t in targets], [
            (EVIL.host, HostAction.SKIP),
            (MX1.host, HostAction.REQUIRE_VERIFIED_TLS),
        ])

    def test_first_within_preference_only(self) -> None:
        """
        C{first} moves a host ahead of hosts of equal preference, never
        ahead of a more preferred one; the shuffle stands otherwise.
        """
        hosts = [MXHost(10, "a"), MXHost(10, "b"), MXHost(10, "c"), MXHost(5, "z"), MXHost(20, "y")]
        targets = plan_attempts(None, hosts, rng=Reverse(), first=lambda host: host in ("b", "y"))
        self.assertEqual([t.host for t in targets], ["z", "b", "c", "a", "y"])

    def test_first_before_truncation(self) -> None:
        """C{first} reorders before C{max_hosts} cuts."""
        hosts = [MXHost(10, "a"), MXHost(10, "b")]
        targets = plan_attempts(None, hosts, rng=NoShuffle(), max_hosts=1, first=lambda host: host == "b")
        self.assertEqual([t.host for t in targets], ["b"])

    def test_empty(self) -> None:
        self.assertEqual(plan_attempts(policy("enforce"), []), ())


class DeliveryPlanTests(unittest.SynchronousTestCase):
    """L{DeliveryPlan}: the mode and the reuse key."""

    def descriptor(self, p: Policy | None) -> PolicyDescriptor:
        if p is None or p.mode is Mode.NONE:
            return PolicyDescriptor(PolicyType.NO_POLICY_FOUND, DOMAIN)
        return PolicyDescriptor(PolicyType.STS, DOMAIN, p.policy_strings, p.mx)

    def plan(self, p: Policy | None, record_id: str | None = "1") -> DeliveryPlan:
        return DeliveryPlan(DOMAIN, p, self.descriptor(p), record_id)

    def test_mode(self) -> None:
        self.assertIsNone(self.plan(None).mode)
        self.assertFalse(self.plan(None).enforce)
        self.assertIs(self.plan(policy("testing")).mode, Mode.TESTING)
        self.assertFalse(self.plan(policy("testing")).enforce)
        self.assertTrue(self.plan(policy("enforce")).enforce)

    def test_reuse_key(self) -> None:
        """
        Sessions are reused only under the same domain, host, port, policy
        and TXT id: a changed policy never inherits a session.
        """
        base = self.plan(policy("enforce"))
        key = base.reuse_key(MX1.host, 25)
        self.assertEqual(key, self.plan(policy("enforce")).reuse_key(MX1.host, 25))
        self.assertNotEqual(key, base.reuse_key(MX2.host, 25))
        self.assertNotEqual(key, base.reuse_key(MX1.host, 2525))
        self.assertNotEqual(key, self.plan(policy("testing")).reuse_key(MX1.host, 25))
        self.assertNotEqual(key, self.plan(policy("enforce", MX1.host)).reuse_key(MX1.host, 25))
        self.assertNotEqual(key, self.plan(policy("enforce"), "2").reuse_key(MX1.host, 25))
        self.assertNotEqual(key, self.plan(None).reuse_key(MX1.host, 25))
        hash(key)


class AccountingTests(unittest.SynchronousTestCase):
    """
    L{skip_result} and L{session_result}: what one skipped host or one
    session adds to the TLSRPT results (RFC 8460 §4).
    """

    STS = PolicyDescriptor(PolicyType.STS, DOMAIN, ("version: STSv1",), (MX1.host,))
    NONE = PolicyDescriptor(PolicyType.NO_POLICY_FOUND, DOMAIN)
    IP = "192.0.2.1"
    NOT_OFFERED = starttls_not_supported_details(MX1.host, IP)
    EXPIRED = FailureDetails(ResultType.CERTIFICATE_EXPIRED, receiving_mx_hostname=MX1.host, receiving_ip=IP)

    def test_skip(self) -> None:
        """A host skipped under enforce: one failure, the plan's details."""
        target = plan_host(policy("enforce", MX1.host), EVIL)
        assert target.skip_reason is not None
        self.assertEqual(skip_result(self.STS, target), Result(self.STS, 0, [target.skip_reason]))

    def test_sts_every_session_counts(self) -> None:
        """Under enforce and testing: success when verified, else the failure."""
        for mode in ("enforce", "testing"):
            target = plan_host(policy(mode, MX1.host), MX1)
            self.assertEqual(session_result(self.STS, target, self.IP, None, True), Result(self.STS, 1))
            self.assertEqual(
                session_result(self.STS, target, self.IP, self.EXPIRED, True), Result(self.STS, 0, [self.EXPIRED])
            )
            self.assertEqual(
                session_result(self.STS, target, self.IP, self.NOT_OFFERED, False),
                Result(self.STS, 0, [self.NOT_OFFERED]),
            )

    def test_testing_mismatch_wins(self) -> None:
        """Testing, an unlisted host: the mismatch (with receiving-ip) wins over the TLS outcome."""
        target = plan_host(policy("testing", MX1.host), EVIL)
        expected = Result(
            self.STS,
            0,
            [FailureDetails(
                ResultType.VALIDATION_FAILURE,
                receiving_mx_hostname=EVIL.host,
                receiving_ip=self.IP,
                failure_reason_code=MX_MISMATCH_REASON,
            )],
        )
        self.assertEqual(session_result(self.STS, target, self.IP, None, True), expected)
        self.assertEqual(session_result(self.STS, target, self.IP, self.EXPIRED, True), expected)

    def test_opportunistic(self) -> None:
        """
        No policy: a completed handshake is a success (verified or not), a
        failed one a failure, a session without TLS not counted.
        """
        for target in (plan_host(None, MX1), plan_host(policy("none"), MX1)):
            self.assertEqual(session_result(self.NONE, target, self.IP, None, True), Result(self.NONE, 1))
            self.assertEqual(session_result(self.NONE, target, self.IP, self.EXPIRED, True), Result(self.NONE, 1))
            self.assertEqual(
                session_result(self.NONE, target, self.IP, self.EXPIRED, False), Result(self.NONE, 0, [self.EXPIRED])
            )
            self.assertIsNone(session_result(self.NONE, target, self.IP, self.NOT_OFFERED, False))
            refused = starttls_not_supported_details(MX1.host, self.IP, reply_code=454)
            self.assertIsNone(session_result(self.NONE, target, self.IP, refused, False))


class PlanDANETests(unittest.SynchronousTestCase):
    """
    L{plan_host} with DANE (RFC 8461 §2, RFC 7672 §2.2): a host with a
    secure usable TLSA RRset is decided by DANE whatever MTA-STS says; a
    failed DANE lookup defers the host; hosts without DANE follow MTA-STS.
    """

    EE = TLSARecord(3, 1, 1, b"\x01" * 32)

    def status(self, state: DANEState, host: str = MX1.host, base: str | None = None) -> DANEStatus:
        applies = state in (DANEState.USABLE, DANEState.UNUSABLE)
        base = base or host
        return DANEStatus(
            host, state, 25, base if applies else None, f"_25._tcp.{base}" if applies else None,
            (self.EE,) if applies else (), (self.EE,) if state is DANEState.USABLE else (), 300,
            "SERVFAIL from 127.0.0.1:53" if state is DANEState.BOGUS else "")

    def test_usable_whatever_the_policy(self) -> None:
        """Every policy, listed or not: REQUIRE_DANE, verified by the TLSA records."""
        usable = self.status(DANEState.USABLE)
        for p in (policy("enforce", MX1.host), policy("enforce", "other.example"), policy("testing"),
                  policy("none"), None):
            target = plan_host(p, MX1, usable)
            self.assertEqual(
                (target.action, target.verify, target.require_tls, target.skipped, target.skip_reason),
                (HostAction.REQUIRE_DANE, VerifyMode.DANE, True, False, None), p)
            self.assertEqual(target.tlsa_records, (self.EE,))
            self.assertIs(target.dane, usable)
            self.assertTrue(target.decided_by_dane)
        self.assertFalse(plan_host(policy("enforce", "other.example"), MX1, usable).matches_policy)

    def test_sni_is_the_tlsa_base_domain(self) -> None:
        """RFC 7672 §8.1: SNI = the TLSA base domain (here the CNAME-expanded host name)."""
        target = plan_host(None, MX1, self.status(DANEState.USABLE, base="host.provider.example"))
        self.assertEqual(target.server_name, "host.provider.example")
        self.assertEqual(plan_host(None, MX1).server_name, MX1.host)

    def test_bogus_defers(self) -> None:
        """
        RFC 7672 §2.1.2: a failed DANE lookup makes the host unreachable,
        even when MTA-STS would accept it; reported as dnssec-invalid.
        """
        bogus = self.status(DANEState.BOGUS)
        for p in (policy("enforce", MX1.host), policy("testing"), None):
            target = plan_host(p, MX1, bogus)
            self.assertEqual((target.action, target.skipped, target.require_tls), (HostAction.DEFER, True, True))
            self.assertEqual(
                target.skip_reason,
                FailureDetails(ResultType.DNSSEC_INVALID, receiving_mx_hostname=MX1.host,
                               failure_reason_code=DANE_LOOKUP_FAILED_REASON))
            self.assertTrue(target.decided_by_dane)
            self.assertEqual(target.tlsa_records, ())

    def test_unusable(self) -> None:
        """
        RFC 7672 §2.2: secure, all unusable: TLS required without
        authentication; an enforce policy still verifies and skips.
        """
        unusable = self.status(DANEState.UNUSABLE)
        for p in (None, policy("none"), policy("testing")):
            target = plan_host(p, MX1, unusable)
            self.assertEqual((target.action, target.verify, target.require_tls),
                             (HostAction.REQUIRE_TLS, VerifyMode.RECORD_ONLY, True), p)
            self.assertEqual(target.tlsa_records, ())
        listed = plan_host(policy("enforce", MX1.host), MX1, unusable)
        self.assertEqual((listed.action, listed.verify, listed.require_tls),
                         (HostAction.REQUIRE_VERIFIED_TLS, VerifyMode.VERIFY, True))
        unlisted = plan_host(policy("enforce", "other.example"), MX1, unusable)
        self.assertEqual((unlisted.action, unlisted.skipped), (HostAction.SKIP, True))
        self.assertEqual(plan_host(policy("testing", "other.example"), MX1, unusable).matches_policy, False)

    def test_without_dane_as_before(self) -> None:
        """Secure denial, insecure or not looked up: the MTA-STS decision, unchanged."""
        for p in (policy("enforce", MX1.host), policy("enforce", "other.example"), policy("testing"), None):
            for state in (DANEState.NONE, DANEState.INSECURE):
                target = plan_host(p, MX1, self.status(state))
                self.assertEqual(attrs.evolve(target, dane=None), plan_host(p, MX1))
                self.assertFalse(target.decided_by_dane)

    def test_order_unchanged(self) -> None:
        """RFC 7672 §2.2.1: a less preferred host with TLSA never goes first."""
        statuses = {MX2.host: self.status(DANEState.USABLE, MX2.host)}
        targets = plan_attempts(None, [MX2, MX1], rng=NoShuffle(), dane=statuses)
        self.assertEqual([(t.host, t.action) for t in targets],
                         [(MX1.host, HostAction.OPPORTUNISTIC), (MX2.host, HostAction.REQUIRE_DANE)])

    def test_reuse_key_holds_the_tlsa_state(self) -> None:
        plan = DeliveryPlan(DOMAIN, None, PolicyDescriptor(PolicyType.NO_POLICY_FOUND, DOMAIN))
        usable = self.status(DANEState.USABLE)
        self.assertNotEqual(plan.reuse_key(MX1.host, 25, usable), plan.reuse_key(MX1.host, 25))
        self.assertEqual(plan.reuse_key(MX1.host, 25, usable),
                         plan.reuse_key(MX1.host, 25, attrs.evolve(usable, ttl=5, detail="x")))
        other = attrs.evolve(usable, usable=(TLSARecord(3, 1, 1, b"\x02" * 32),))
        self.assertNotEqual(plan.reuse_key(MX1.host, 25, usable), plan.reuse_key(MX1.host, 25, other))


class PrecedenceTests(unittest.SynchronousTestCase):
    """
    The precedence rows of issue 14, each from DNS answers (a fake
    resolver) through the TLSA search and the plan to the certificate
    check: what a sender following the plan would accept.
    """

    def setUp(self) -> None:
        self.pki = PKI()
        self.resolver = FakeResolver(secure=True)
        self.resolver.addresses[MX1.host] = ["192.0.2.1"]

    def decide(self, p: Policy | None, chain: list[Any]) -> tuple[PlannedHost, bool]:
        """The plan for MX1, and whether its certificate check passes as the plan asks."""
        status = self.successResultOf(discover_dane(self.resolver, MX1.host, mx_secure=True))
        target = plan_host(p, MX1, status)
        if target.action is HostAction.REQUIRE_DANE:
            refs = status.reference_identifiers(DOMAIN)
            return target, dane_verify(chain, target.tlsa_records, refs).passed
        # MTA-STS: PKIX to the trusted CA, and the MX host name.
        store = crypto.X509Store()
        store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(self.pki.ca_pem)))
        try:
            crypto.X509StoreContext(store, crypto.X509.from_cryptography(chain[0]),
                                    [crypto.X509.from_cryptography(c) for c in chain[1:]]).verify_certificate()
        except crypto.X509StoreContextError:
            return target, False
        return target, dane_name_matches(chain[0], [MX1.host])

    def tlsa(self, certificate: Any) -> None:
        data = tlsa_association_data(certificate, 1, 1)
        assert data is not None
        self.resolver.tlsa[f"_25._tcp.{MX1.host}"] = [TLSARecord(3, 1, 1, data)]

    def test_dane_pass_sts_would_refuse(self) -> None:
        """
        A self-signed certificate matching DANE-EE, on a host outside the
        enforced policy: delivered (DANE decides).
        """
        chain = self.pki.self_signed(MX1.host).certificates()
        self.tlsa(chain[0])
        target, passed = self.decide(policy("enforce", "other.example"), chain)
        self.assertEqual((target.action, passed), (HostAction.REQUIRE_DANE, True))

    def test_dane_fail_sts_would_accept(self) -> None:
        """A WebPKI-valid, listed host whose TLSA does not match: not delivered."""
        chain = self.pki.valid(MX1.host).certificates()
        self.tlsa(self.pki.self_signed(MX1.host).certificates()[0])
        target, passed = self.decide(policy("enforce", MX1.host), chain)
        self.assertEqual((target.action, passed), (HostAction.REQUIRE_DANE, False))
        self.assertTrue(target.require_tls)

    def test_insecure_zone_wrong_tlsa_ignored(self) -> None:
        """An insecure TLSA RRset that matches nothing: ignored, MTA-STS (or opportunistic TLS) decides."""
        chain = self.pki.valid(MX1.host).certificates()
        self.tlsa(self.pki.self_signed(MX1.host).certificates()[0])
        self.resolver.security[f"_25._tcp.{MX1.host}"] = False
        target, passed = self.decide(policy("enforce", MX1.host), chain)
        self.assertEqual((target.action, passed), (HostAction.REQUIRE_VERIFIED_TLS, True))
        target, _ = self.decide(None, chain)
        self.assertIs(target.action, HostAction.OPPORTUNISTIC)

    def test_bogus_is_temporary(self) -> None:
        """A bogus TLSA answer (SERVFAIL): the host is deferred, never left to MTA-STS."""
        self.resolver.tlsa[f"_25._tcp.{MX1.host}"] = DNSTemporaryError("SERVFAIL", rdtype="TLSA")
        target, _ = self.decide(policy("enforce", MX1.host), self.pki.valid(MX1.host).certificates())
        self.assertEqual((target.action, target.skipped), (HostAction.DEFER, True))
        assert target.skip_reason is not None
        self.assertIs(target.skip_reason.result_type, ResultType.DNSSEC_INVALID)

    def test_signed_zone_without_tlsa(self) -> None:
        """A secure denial of TLSA: MTA-STS as without DANE."""
        target, passed = self.decide(policy("enforce", MX1.host), self.pki.valid(MX1.host).certificates())
        self.assertEqual((target.action, passed), (HostAction.REQUIRE_VERIFIED_TLS, True))
        assert target.dane is not None
        self.assertIs(target.dane.state, DANEState.NONE)
