"""
RFC 8460 §4 session counting, end to end on loopback sockets: a delivery
counts each session once, and a policy lookup problem that did not stop a
session is a failure detail, not a second session (docs/design.rst "TLSRPT
accounting").  Every delivery's results must also make a report that
passes the RFC 8460 §4.4 validator of C{tests.test_tlsrpt_report}.
"""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from mtasts_twisted.cache import FALLBACK
from mtasts_twisted.delivery import DeliveryResult, Status
from mtasts_twisted.results import PolicyType, Result
from mtasts_twisted.testing.dns import Behaviour as DNSBehaviour
from mtasts_twisted.testing.smtp import Behaviour
from mtasts_twisted.tlsrpt import Report, merge_results
from tests.test_faults import Harness, policy_text
from tests.test_tlsrpt_report import SETTINGS, validate_report

DOMAIN = "counted.test"
MX = "mx.counted.test"
BOB = "bob@" + DOMAIN


def summary(results: Any) -> tuple[int, int, list[tuple[str, str | None, int]]]:
    """(successful sessions, failed sessions, [(result type, reason, count)]) of one merged policy."""
    [merged] = [r for r in merge_results(results) if r.policy.policy_domain == DOMAIN]
    return (
        merged.success_count,
        merged.failure_count,
        [(f.result_type.value, f.failure_reason_code, f.failed_session_count) for f in merged.failures],
    )


class SessionCountTests(Harness, unittest.TestCase):
    """One delivery, one session: counted once, whatever the lookup went through."""

    def setUp(self) -> None:
        super().setUp()
        self.world.publish(DOMAIN, policy_text("enforce", MX), record_id="1", ttl=0)
        self.mx = self.smtp(Behaviour(certificate=self.pki.valid(MX)), MX, DOMAIN)

    def validated(self, result: DeliveryResult) -> DeliveryResult:
        report = Report.build(SETTINGS, DOMAIN, "2024-05-01", "t1", merge_results(result.results))
        validate_report(report.to_json())
        return result

    async def delivered(self) -> DeliveryResult:
        result = self.validated(await self.deliver(BOB))
        self.assertEqual(result.outcomes[0].status, Status.DELIVERED, result.outcomes[0])
        return result

    def servfail_txt(self) -> None:
        self.world.resolver.clear_cache()
        self.world.dns.set_behaviour("_mta-sts." + DOMAIN, DNSBehaviour.SERVFAIL)

    async def test_plain_delivery(self) -> None:
        """No lookup problem: one success, no failure details."""
        result = await self.delivered()
        self.assertEqual(summary(result.results), (1, 0, []))

    async def test_fallback_then_verified_session(self) -> None:
        """
        The TXT lookup fails, the cached enforce policy is used and the
        session verifies: success 1, failure 0, the lookup problem one
        failure detail (before: success 1 and failure 1 for one delivery).
        """
        await self.delivered()
        self.servfail_txt()
        result = await self.delivered()
        self.assertTrue(result.outcomes[0].verified)
        self.assertEqual(summary(result.results),
                         (1, 0, [("sts-policy-fetch-error", "dns-lookup" + FALLBACK, 1)]))

    async def test_fallback_then_failed_session(self) -> None:
        """
        Testing policy, the TXT lookup fails and the certificate has
        expired: one failed session, two failure details (RFC 8460 §4: "a
        single send attempt encountered multiple errors").
        """
        self.world.publish(DOMAIN, policy_text("testing", MX), record_id="1", ttl=0)
        self.mx.behaviour = Behaviour(certificate=self.pki.expired(MX))
        await self.delivered()
        self.servfail_txt()
        result = await self.delivered()
        self.assertEqual(summary(result.results), (0, 1, [
            ("sts-policy-fetch-error", "dns-lookup" + FALLBACK, 1),
            ("certificate-expired", "X509_V_ERR_CERT_HAS_EXPIRED", 1),
        ]))

    async def test_new_policy_unfetchable_then_backoff(self) -> None:
        """
        A new TXT id whose policy cannot be fetched (404), then the backoff
        for that id: two deliveries, two verified sessions under the cached
        policy, two failure details that merge, no failed session.
        """
        await self.delivered()
        self.world.publish(DOMAIN, None, record_id="2", ttl=0)
        self.world.resolver.clear_cache()
        results = list((await self.delivered()).results) + list((await self.delivered()).results)
        self.assertEqual(summary(results),
                         (2, 0, [("sts-policy-fetch-error", "no-policy-served" + FALLBACK, 2)]))

    async def test_first_fetch_fails(self) -> None:
        """
        Nothing cached and the policy host serves 404: delivered with
        opportunistic TLS; the session counts once, the fetch problem is a
        detail.
        """
        self.world.publish(DOMAIN, None, record_id="1", ttl=0)
        result = await self.delivered()
        self.assertEqual(result.policy_mode, None)
        self.assertEqual(result.results[0].policy.policy_type, PolicyType.STS)
        self.assertEqual(summary(result.results), (1, 0, [("sts-policy-fetch-error", "no-policy-served", 1)]))

    async def test_temporary_failure_is_one_failed_session(self) -> None:
        """
        Nothing cached and the TXT lookup fails: the lookup stopped the
        delivery (deferred), which counts as one failed session.
        """
        self.servfail_txt()
        result = self.validated(await self.deliver(BOB))
        self.assertEqual(result.outcomes[0].status, Status.TRANSIENT)
        self.assertEqual(self.mx.sessions, [])
        self.assertEqual(summary(result.results), (0, 1, [("sts-policy-fetch-error", "dns-lookup", 1)]))


class LookupResultTests(Harness, unittest.TestCase):
    """
    The result of a lookup alone (what the socketmap records; Postfix
    counts the sessions): a problem is a detail without a session, in
    words only in the log and L{Lookup.error}.
    """

    async def test_fallback_lookup(self) -> None:
        self.world.publish(DOMAIN, policy_text("enforce", MX), record_id="1", ttl=0)
        await self.cache.get(DOMAIN)
        self.world.publish(DOMAIN, None, record_id="2", ttl=0)
        self.world.resolver.clear_cache()
        lookup = await self.cache.get(DOMAIN)
        self.assertEqual(lookup.policy.mx, (MX,))
        result: Result = lookup.result
        self.assertEqual((result.success_count, result.failure_count), (0, 0))
        [detail] = result.failures
        self.assertEqual((detail.failure_reason_code, detail.failed_session_count, detail.additional_information),
                         ("no-policy-served" + FALLBACK, 1, None))
        self.assertIn("404", lookup.error or "")
        self.assertNotIn("404", repr(result.to_json()))
