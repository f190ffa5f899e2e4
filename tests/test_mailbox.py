"""
Tests for L{mtasts_twisted.delivery.mailbox} (RFC 5321 §4.1.2 mailboxes,
RFC 6531 §3.3 UTF-8) and the wire form L{wire_address} sends.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.delivery.mailbox import (
    Mailbox,
    MailboxError,
    parse_mailbox,
    parse_path,
    quote_local_part,
)
from mtasts_twisted.delivery.protocol import Path, wire_address


class MailboxTests(SynchronousTestCase):
    def test_dot_string_and_quoted(self) -> None:
        self.assertEqual(parse_mailbox("a.b+c@example.com"), Mailbox("a.b+c", "example.com"))
        self.assertEqual(parse_mailbox('"a b"@example.com'), Mailbox("a b", "example.com"))
        self.assertEqual(parse_mailbox('"a\\"b\\\\"@example.com'), Mailbox('a"b\\', "example.com"))
        self.assertEqual(parse_mailbox('"a@b"@example.com'), Mailbox("a@b", "example.com"))
        self.assertEqual(parse_mailbox("a@[192.0.2.1]"), Mailbox("a", "[192.0.2.1]"))
        self.assertEqual(parse_mailbox("a@[IPv6:2001:db8::1]").domain, "[IPv6:2001:db8::1]")

    def test_least_quoting(self) -> None:
        """RFC 5321 §4.1.2: the form with the least quoting."""
        self.assertEqual(str(parse_mailbox('"plain"@example.com')), "plain@example.com")
        self.assertEqual(str(parse_mailbox('"a b"@example.com')), '"a b"@example.com')
        self.assertEqual(str(parse_mailbox('"\\a"@example.com')), "a@example.com")
        self.assertEqual(quote_local_part('x"y'), '"x\\"y"')
        self.assertEqual(quote_local_part("a..b"), '"a..b"')
        self.assertEqual(quote_local_part(""), '""')

    def test_rejected(self) -> None:
        for text in ("a..b@example.com", ".a@example.com", "a.@example.com", "a b@example.com", "a@b@c.com",
                     "a", "@example.com", "a@", "a@-x.com", "a@x-.com", "a@exa_mple.com", "a@example.com.",
                     'a"b"@example.com', '"a\nb"@example.com', '"a\x00"@example.com', '"a\x7f"@example.com',
                     "a\r@example.com", '"a\\\n"@example.com', "a@[192.0.2.300]", "a@[IPv6:zz]", "a@[x]",
                     '"unterminated@example.com', "a@bü_cher.test", "a\u0085@example.com"):
            self.assertRaises(MailboxError, parse_mailbox, text)

    def test_utf8(self) -> None:
        """RFC 6531 §3.3: UTF-8 in atext, qtext and U-labels, only where allowed."""
        box = parse_mailbox("δοκιμή@παράδειγμα.δοκιμή")
        self.assertTrue(box.utf8)
        self.assertFalse(parse_mailbox("bob@example.com").utf8)
        error = self.assertRaises(MailboxError, parse_mailbox, "bob@bücher.test", utf8=False)
        self.assertTrue(error.utf8)
        self.assertRaises(MailboxError, parse_mailbox, "bob@bücher。test")

    def test_sizes(self) -> None:
        """RFC 5321 §4.5.3.1: 64 octets of local part, 255 of domain, 256 of path."""
        parse_mailbox("a" * 64 + "@example.com")
        error = self.assertRaises(MailboxError, parse_mailbox, "a" * 65 + "@example.com")
        self.assertTrue(error.too_long)
        self.assertTrue(self.assertRaises(MailboxError, parse_mailbox, "ü" * 33 + "@example.com").too_long)
        long_domain = ".".join(["d" * 63] * 4)  # 255 octets
        parse_mailbox("a@" + long_domain)
        self.assertTrue(self.assertRaises(MailboxError, parse_mailbox, "a@x" + long_domain).too_long)
        domain = "d" * 60 + "." + "e" * 60 + "." + "f" * 60 + "." + "g" * 57
        self.assertEqual(parse_path("<" + "b" * 13 + "@" + domain + ">")[0], Mailbox("b" * 13, domain))
        self.assertTrue(self.assertRaises(MailboxError, parse_path, "<" + "b" * 14 + "@" + domain + ">").too_long)

    def test_path(self) -> None:
        self.assertEqual(parse_path("<a@example.com> SIZE=10"), (Mailbox("a", "example.com"), " SIZE=10"))
        self.assertEqual(parse_path(" <a@example.com>"), (Mailbox("a", "example.com"), ""))
        self.assertEqual(parse_path("a@example.com SIZE=1"), (Mailbox("a", "example.com"), " SIZE=1"))
        self.assertEqual(parse_path('<"a> b"@example.com>'), (Mailbox("a> b", "example.com"), ""))
        self.assertEqual(parse_path("<@r1.example,@r2.example:a@example.com>")[0], Mailbox("a", "example.com"))
        self.assertEqual(parse_path("<>", null=True), (None, ""))
        for text in ("<>", "<a@example.com", "<a@example.com>x", "<@r1.example>", "<@:a@example.com>", ""):
            self.assertRaises(MailboxError, parse_path, text)


class WireAddressTests(SynchronousTestCase):
    """What delivery sends in MAIL FROM and RCPT TO (RFC 5321 §4.1.2, RFC 6531 §3.2)."""

    def test_quoted_local_part_sent_quoted(self) -> None:
        self.assertEqual(wire_address('"a b"@example.com'), Path(b'"a b"@example.com', False))
        self.assertEqual(wire_address('"x\\"y"@Example.COM'), Path(b'"x\\"y"@example.com', False))
        self.assertEqual(wire_address('"plain"@example.com'), Path(b"plain@example.com", False))

    def test_idn_and_utf8(self) -> None:
        self.assertEqual(wire_address("bob@bücher.test"), Path(b"bob@xn--bcher-kva.test", False))
        self.assertEqual(wire_address("jörg@bücher.test"), Path("jörg@bücher.test".encode(), True))
        self.assertEqual(wire_address('"jö rg"@example.com'), Path('"jö rg"@example.com'.encode(), True))

    def test_literal_and_null(self) -> None:
        self.assertEqual(wire_address(""), Path(b"", False))
        self.assertEqual(wire_address("a@[192.0.2.1]"), Path(b"a@[192.0.2.1]", False))

    def test_unsendable(self) -> None:
        for text in ('"b\nBcc: y"@x.test', "a b@example.com", "a@b@c", "<a@example.com>", "a@", "a" * 65 + "@x.test",
                     "a@xn--bad-.test", "a\x00@example.com"):
            self.assertRaises(ValueError, wire_address, text)
