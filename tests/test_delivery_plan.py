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

from twisted.trial import unittest

from mtasts_twisted.delivery import (
    DeliveryPlan,
    HostAction,
    PlannedHost,
    plan_attempts,
    plan_host,
)
from mtasts_twisted.delivery.accounting import session_result, skip_result
from mtasts_twisted.dns import MXHost
from mtasts_twisted.policy import Mode, Policy, parse_policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.delivery.details import MX_MISMATCH_REASON, starttls_not_supported_details
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
