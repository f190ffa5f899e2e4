"""
Tests for L{mtasts_twisted.dsn}: RFC 3464 structure, parsed back with the
C{email} package.
"""

from __future__ import annotations

import email
import email.policy
import io

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.relay.dsn import build_dsn, needs_dsn, read_headers, status_code_of


@attrs.frozen
class Msg:
    id: str = "0000000000000001-abcdef01"
    sender: str = "alice@example.org"
    created: float = 1_700_000_000.0


HEADERS = b"From: alice@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n"


class DSNTests(SynchronousTestCase):
    def parse(self, data: bytes) -> email.message.Message:
        return email.message_from_bytes(data, policy=email.policy.compat32)

    def test_structure(self) -> None:
        data = build_dsn(
            Msg(),
            [
                (
                    "bob@example.com",
                    "5.1.1",
                    "550 5.1.1 No such user",
                    "mx.example.com",
                ),
                (
                    "carol@example.com",
                    "4.4.7",
                    "delivery time expired; last error: 4.4.1 connection refused",
                    None,
                ),
            ],
            "relay.example.org",
            original_headers=HEADERS,
            date=1_700_000_100.0,
        )
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        msg = self.parse(data)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(msg["To"], "<alice@example.org>")
        self.assertIn("MAILER-DAEMON@relay.example.org", msg["From"])
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        parts = msg.get_payload()
        self.assertEqual(
            [p.get_content_type() for p in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertIn("bob@example.com", parts[0].get_payload())
        blocks = parts[1].get_payload()
        self.assertEqual(len(blocks), 3)
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; relay.example.org")
        self.assertTrue(
            blocks[0]["Arrival-Date"].endswith("-0000")
            or "GMT" in blocks[0]["Arrival-Date"]
        )
        bob, carol = blocks[1], blocks[2]
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@example.com")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        self.assertEqual(bob["Remote-MTA"], "dns; mx.example.com")
        self.assertEqual(carol["Status"], "4.4.7")
        self.assertIsNone(carol["Remote-MTA"])
        self.assertTrue(
            carol["Diagnostic-Code"].startswith(
                "X-mtasts-twisted; delivery time expired"
            )
        )
        original = parts[2].get_payload()
        self.assertIn("Subject: hi", original)

    def test_delayed(self) -> None:
        data = build_dsn(
            Msg(), [("bob@example.com", "4.4.1", "timeout", None)], "r", kind="delayed"
        )
        block = self.parse(data).get_payload()[1].get_payload()[1]
        self.assertEqual(block["Action"], "delayed")

    def test_bad_input(self) -> None:
        self.assertRaises(ValueError, build_dsn, Msg(), [], "r")
        self.assertRaises(
            ValueError, build_dsn, Msg(), [("b@x", "550", "x", None)], "r"
        )
        self.assertRaises(
            ValueError,
            build_dsn,
            Msg(),
            [("b@x", "5.0.0", "x", None)],
            "r",
            kind="bounced",
        )

    def test_no_header_injection(self) -> None:
        data = build_dsn(
            Msg(), [("b@x", "5.0.0", "550 bad\r\nX-Evil: 1", "mx\r\nX-Evil: 2")], "r"
        )
        self.assertNotIn(b"\r\nX-Evil", data)

    def test_needs_dsn(self) -> None:
        self.assertTrue(needs_dsn("alice@example.org"))
        self.assertFalse(needs_dsn(""))
        self.assertFalse(needs_dsn("<>"))

    def test_status_code_of(self) -> None:
        self.assertEqual(status_code_of(550, "5.7.1 relay denied"), "5.7.1")
        self.assertEqual(status_code_of(550, "no enhanced code"), "5.0.0")
        self.assertEqual(status_code_of(None, "4.7.5 certificate not trusted"), "4.7.5")
        self.assertEqual(status_code_of(None, "odd", "4.0.0"), "4.0.0")
        self.assertEqual(status_code_of(451, "5.1.1 mismatched class"), "4.0.0")

    def test_read_headers(self) -> None:
        f = io.BytesIO(HEADERS + b"\r\nbody\r\nX: not a header\r\n")
        self.assertEqual(read_headers(f), HEADERS)
        self.assertEqual(
            len(read_headers(io.BytesIO(b"X: " + b"y" * 100000), limit=1000)), 1000
        )
