"""
The outcomes a delivery decides without a server's reply to a recipient
(L{mtasts_twisted.delivery.verdict}), pure: which status and which
enhanced status code the recipients no MX host took are given, and in
which order the reasons win.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.delivery import MAX_ERRORS_SHOWN, RecipientOutcome, Status
from mtasts_twisted.delivery.verdict import every_recipient, unsent

DOMAIN = "example.com"
PENDING = ["bob@example.com", "carol@example.com"]


def _unsent(
    errors: list[str], refused: str | None = None, dane_failed: bool = False, enforce: bool = False
) -> dict[str, RecipientOutcome]:
    return unsent(
        DOMAIN, PENDING, errors, refused=refused, dane_failed=dane_failed, enforce=enforce,
        last_host="mx2.example.com", last_code=421,
    )


class EveryRecipientTests(SynchronousTestCase):
    def test_one_outcome_each(self) -> None:
        """Each recipient gets the status and message, no code, no host."""
        outcomes = every_recipient(PENDING, Status.PERMANENT, "5.1.10 example.com accepts no mail")
        self.assertEqual(list(outcomes), PENDING)
        for recipient, outcome in outcomes.items():
            self.assertEqual(
                outcome,
                RecipientOutcome(recipient, Status.PERMANENT, None, "5.1.10 example.com accepts no mail",
                                 None, None, False),
            )


class UnsentTests(SynchronousTestCase):
    def test_opportunistic(self) -> None:
        """Without a policy: 4.4.1, the last code and host, the errors joined."""
        outcomes = _unsent(["mx1.example.com [192.0.2.1]: refused", "mx2.example.com [192.0.2.2]: 421 busy"])
        self.assertEqual(list(outcomes), PENDING)
        outcome = outcomes["bob@example.com"]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertEqual((outcome.code, outcome.mx_host), (421, "mx2.example.com"))
        self.assertEqual(
            outcome.message,
            "4.4.1 no MX host of example.com took the message: "
            "mx1.example.com [192.0.2.1]: refused; mx2.example.com [192.0.2.2]: 421 busy",
        )

    def test_nothing_tried(self) -> None:
        """No error at all: the message says no host could be tried."""
        outcome = _unsent([])["carol@example.com"]
        self.assertTrue(outcome.message.endswith(": no MX host could be tried"), outcome.message)

    def test_last_errors_only(self) -> None:
        """Only the last L{MAX_ERRORS_SHOWN} errors are given."""
        errors = [f"mx{n}.example.com: failed" for n in range(MAX_ERRORS_SHOWN + 2)]
        message = _unsent(errors)["bob@example.com"].message
        self.assertNotIn(errors[1], message)
        self.assertTrue(message.endswith("; ".join(errors[-MAX_ERRORS_SHOWN:])), message)

    def test_enforce_is_transient(self) -> None:
        """Under C{enforce}: 4.7.5, never permanent (RFC 8461 §5.1)."""
        outcome = _unsent(["mx1.example.com: not verified"], enforce=True)["bob@example.com"]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertTrue(outcome.message.startswith(
            "4.7.5 no MX host of example.com passed MTA-STS (enforce) checks"), outcome.message)

    def test_dane_before_enforce(self) -> None:
        """A DANE failure names DANE, transient (RFC 7672 §2.2), also under C{enforce}."""
        outcome = _unsent(["mx1.example.com: tlsa"], enforce=True, dane_failed=True)["bob@example.com"]
        self.assertEqual(outcome.status, Status.TRANSIENT)
        self.assertTrue(outcome.message.startswith(
            "4.7.5 no MX host of example.com passed DANE or MTA-STS checks"), outcome.message)

    def test_requiretls_refusal_is_permanent(self) -> None:
        """REQUIRETLS kept from every host: permanent, its reason as given, no code (RFC 8689 §4.2.1)."""
        reason = "5.7.30 REQUIRETLS: no MX host of example.com meets the sender's TLS requirements: ..."
        outcomes = _unsent(["mx1.example.com: refused"], refused=reason, dane_failed=True, enforce=True)
        self.assertEqual(list(outcomes), PENDING)
        for recipient, outcome in outcomes.items():
            self.assertEqual(
                outcome, RecipientOutcome(recipient, Status.PERMANENT, None, reason, "mx2.example.com", None, False)
            )
