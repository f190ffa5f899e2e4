"""
Issue 16: the pure parts of RFC 8689 in delivery
(L{mtasts_twisted.delivery.requiretls}): which planned hosts a REQUIRETLS
message may be tried at, how C{TLS-Required: No} relaxes the plan, the
session check, the header scan, and what the unsent recipients get.
"""

from __future__ import annotations

import io

import attrs
from twisted.trial import unittest

from mtasts_twisted.dane import DANEState, DANEStatus
from mtasts_twisted.delivery import scan_message
from mtasts_twisted.delivery.plan import HostAction, plan_host
from mtasts_twisted.delivery.requiretls import (
    RefusalKind,
    SenderControls,
    relax_for_tls_optional,
    requiretls_allows,
    requiretls_refusal,
    requiretls_target,
    session_refusal,
    tls_required_no,
)
from mtasts_twisted.delivery.values import MAX_HEADER_SCAN
from mtasts_twisted.dns import MXHost, TLSARecord
from mtasts_twisted.policy import Policy, parse_policy
from mtasts_twisted.tls import VerifyMode

MX1 = MXHost(10, "mx1.example.com")
MX2 = MXHost(20, "mx2.example.com")
EE = TLSARecord(3, 1, 1, b"\x01" * 32)


def policy(mode: str, *mx: str) -> Policy:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx or ("*.example.com",)]
    return parse_policy("\n".join(lines + ["max_age: 86400"]) + "\n")


def dane(state: DANEState) -> DANEStatus:
    applies = state in (DANEState.USABLE, DANEState.UNUSABLE)
    return DANEStatus(MX1.host, state, 25, MX1.host if applies else None, None,
                      (EE,) if applies else (), (EE,) if state is DANEState.USABLE else (), 300, "")


@attrs.define
class FakeAttempt:
    host: str
    requiretls_refused: RefusalKind | None = None
    error: str | None = None
    tls_decided: bool = True
    tls_negotiated: bool = True
    verified: bool = True


class RequireTLSAllowsTests(unittest.SynchronousTestCase):
    """L{requiretls_allows}: RFC 8689 §4.2.1 step 2 for each planned action."""

    def test_allowed(self) -> None:
        """DANE (usable), enforce listed, testing listed: allowed."""
        for target in (
            plan_host(None, MX1, dane(DANEState.USABLE)),
            plan_host(policy("enforce"), MX1),
            plan_host(policy("testing"), MX1),
        ):
            self.assertTrue(requiretls_allows(target), target)
            self.assertIsNone(requiretls_refusal(target))

    def test_refused(self) -> None:
        """No policy, mode none, testing or enforce unlisted, unusable TLSA: refused with a reason."""
        cases = {
            "neither DNSSEC": plan_host(None, MX1),
            "neither DNSSEC (DANE) nor": plan_host(policy("none"), MX1),
            "not listed by the domain's MTA-STS policy (testing)": plan_host(policy("testing", "x.test"), MX1),
            "not listed by the domain's MTA-STS policy (enforce)": plan_host(policy("enforce", "x.test"), MX1),
            "none usable": plan_host(None, MX1, dane(DANEState.UNUSABLE)),
        }
        for text, target in cases.items():
            self.assertFalse(requiretls_allows(target), target)
            self.assertIn(text, requiretls_refusal(target) or "")

    def test_testing_held_to_verification(self) -> None:
        """§4.2.1 step 4, no testing-mode leniency: a testing host is verified like enforce."""
        target = requiretls_target(plan_host(policy("testing"), MX1))
        self.assertEqual((target.action, target.verify, target.require_tls),
                         (HostAction.REQUIRE_VERIFIED_TLS, VerifyMode.VERIFY, True))
        enforce = plan_host(policy("enforce"), MX1)
        self.assertIs(requiretls_target(enforce), enforce)


class SessionRefusalTests(unittest.SynchronousTestCase):
    """L{session_refusal}: §4.2.1 steps 4 and 5."""

    def check(self, **kw: object) -> RefusalKind | None:
        values: dict[str, object] = dict(tls_version="TLSv1.3", verified=True, verify_mode=VerifyMode.VERIFY,
                                         extensions={"REQUIRETLS": ""})
        values.update(kw)
        error = session_refusal(**values)  # type: ignore[arg-type]
        return None if error is None else error.kind

    def test_cases(self) -> None:
        self.assertIsNone(self.check())
        self.assertIsNone(self.check(verify_mode=VerifyMode.DANE))
        self.assertIs(self.check(tls_version=None), RefusalKind.TLS)
        self.assertIs(self.check(verified=False), RefusalKind.TLS)
        self.assertIs(self.check(verify_mode=VerifyMode.RECORD_ONLY), RefusalKind.TLS)
        self.assertIs(self.check(extensions={"STARTTLS": ""}), RefusalKind.CAPABILITY)


class RelaxTests(unittest.SynchronousTestCase):
    """L{relax_for_tls_optional}: RFC 8689 §4.2.2 and §8.4."""

    def test_nothing_required(self) -> None:
        for target in (
            plan_host(policy("enforce"), MX1),
            plan_host(policy("enforce", "x.test"), MX1),
            plan_host(None, MX1, dane(DANEState.USABLE)),
            plan_host(None, MX1, dane(DANEState.UNUSABLE)),
            plan_host(None, MX1, dane(DANEState.BOGUS)),
        ):
            relaxed = relax_for_tls_optional(target)
            self.assertEqual((relaxed.action, relaxed.verify, relaxed.require_tls, relaxed.skipped),
                             (HostAction.RECORD_ONLY, VerifyMode.RECORD_ONLY, False, False), target)
            self.assertEqual(relaxed.matches_policy, target.matches_policy)

    def test_unchanged(self) -> None:
        for target in (plan_host(policy("testing"), MX1), plan_host(None, MX1)):
            self.assertIs(relax_for_tls_optional(target), target)


class HeaderTests(unittest.SynchronousTestCase):
    """L{tls_required_no} and L{scan_message}: RFC 8689 §3."""

    def test_forms(self) -> None:
        self.assertTrue(tls_required_no(b"Subject: x\r\nTLS-Required: No\r\n"))
        self.assertTrue(tls_required_no(b"tls-required:no\r\n"))
        self.assertTrue(tls_required_no(b"TLS-Required:\r\n\tNO\r\n"))
        self.assertFalse(tls_required_no(b"TLS-Required: Yes\r\n"))
        self.assertFalse(tls_required_no(b"X-TLS-Required: No\r\n"))
        self.assertFalse(tls_required_no(b""))
        # §3: more than one instance MUST NOT appear: treated as none.
        self.assertFalse(tls_required_no(b"TLS-Required: No\r\nTLS-Required: No\r\n"))

    def test_scan_reads_the_header_only(self) -> None:
        """Only the header counts: the same line in the body does not."""
        self.assertTrue(scan_message(io.BytesIO(b"A: b\r\nTLS-Required: No\r\n\r\nbody\r\n")).tls_required_no)
        self.assertFalse(scan_message(io.BytesIO(b"A: b\r\n\r\nTLS-Required: No\r\n")).tls_required_no)
        self.assertFalse(scan_message(io.BytesIO(b"\r\nTLS-Required: No\r\n")).tls_required_no)
        self.assertTrue(scan_message(io.BytesIO(b"A: b\nTLS-Required: No\n\nbody\n")).tls_required_no)

    def test_scan_bound(self) -> None:
        """A header past MAX_HEADER_SCAN octets is not read further; the whole file is still sized."""
        filler = b"X-Filler: " + b"a" * 998 + b"\r\n"
        count = MAX_HEADER_SCAN // len(filler) + 1
        message = filler * count + b"TLS-Required: No\r\n\r\nbody\r\n"
        info = scan_message(io.BytesIO(message))
        self.assertFalse(info.tls_required_no)
        self.assertEqual(info.size, len(message))


class SenderControlsTests(unittest.SynchronousTestCase):
    """L{SenderControls}: hosts kept, refusals recorded, the permanent verdict."""

    def test_of(self) -> None:
        self.assertTrue(SenderControls.of(True, False, False).requiretls)
        self.assertFalse(SenderControls.of(True, True, False).requiretls)  # §4.2.1: bounces exempt
        self.assertTrue(SenderControls.of(False, False, True).tls_optional)
        self.assertFalse(SenderControls.of(True, False, True).tls_optional)  # §4.1: header ignored

    def test_all_refused_is_permanent(self) -> None:
        controls = SenderControls.of(True, False, False)
        targets = [plan_host(None, MX1), plan_host(None, MX2)]
        self.assertEqual(controls.targets(targets), ())
        text = controls.unsent("example.com", [t.host for t in targets])
        assert text is not None
        self.assertTrue(text.startswith("5.7.30 REQUIRETLS"), text)

    def test_tls_failures_only_is_5710(self) -> None:
        controls = SenderControls.of(True, False, False)
        controls.attempted(FakeAttempt(MX1.host, error="TLS failed", tls_negotiated=False))
        text = controls.unsent("example.com", [MX1.host])
        assert text is not None
        self.assertTrue(text.startswith("5.7.10 "), text)

    def test_other_failure_is_not_permanent(self) -> None:
        controls = SenderControls.of(True, False, False)
        controls.attempted(FakeAttempt(MX1.host, requiretls_refused=RefusalKind.CAPABILITY, error="no"))
        controls.attempted(FakeAttempt(MX2.host, error="connection refused", tls_decided=False))
        self.assertIsNone(controls.unsent("example.com", [MX1.host, MX2.host]))

    def test_skip_kept_for_reporting(self) -> None:
        controls = SenderControls.of(True, False, False)
        skipped = plan_host(policy("enforce", "x.test"), MX1)
        self.assertEqual(controls.targets([skipped]), (skipped,))
        self.assertIn(MX1.host, controls.refused)

    def test_not_requiretls_unchanged(self) -> None:
        controls = SenderControls.of(False, False, False)
        targets = (plan_host(None, MX1),)
        self.assertEqual(controls.targets(targets), targets)
        self.assertIsNone(controls.unsent("example.com", [MX1.host]))


class ReportMailTests(unittest.SynchronousTestCase):
    """Our own TLSRPT report mail carries the header, and delivery reads it (RFC 8460 §5.3, RFC 8689 §3)."""

    def test_report_mail_is_tls_optional(self) -> None:
        from mtasts_twisted.tlsrpt.mail import build_report_message
        from tests.test_tlsrpt_mail import NOW, SETTINGS, make_report

        data = build_report_message(make_report(), SETTINGS, "tlsrpt@example.net", now=NOW,
                                    message_id="m1@mail.sender.example")
        self.assertTrue(scan_message(io.BytesIO(data)).tls_required_no)


class MeteredPassThroughTests(unittest.SynchronousTestCase):
    """The metered deliverer hands the REQUIRETLS flag on (IDeliverer)."""

    def test_passed_on(self) -> None:
        from twisted.internet.defer import succeed

        from mtasts_twisted.delivery import DeliveryResult
        from mtasts_twisted.metrics.collect import MeteredDeliverer, ServiceStats

        seen: list[tuple[bool, bool]] = []

        class Inner:
            def deliver(self, sender, recipients, message, smtputf8=False, requiretls=False):  # type: ignore[no-untyped-def]
                seen.append((smtputf8, requiretls))
                return succeed(DeliveryResult("example.com", None, (), ()))

        metered = MeteredDeliverer(Inner(), ServiceStats())  # type: ignore[arg-type]
        metered.deliver("a@example.org", ["b@example.com"], io.BytesIO(b"x"), requiretls=True)
        metered.deliver("a@example.org", ["b@example.com"], io.BytesIO(b"x"))
        self.assertEqual(seen, [(False, True), (False, False)])
