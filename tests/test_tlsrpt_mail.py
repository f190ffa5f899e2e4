"""
Tests for L{mtasts_twisted.tlsrpt.mail}: the RFC 8460 §5.3 report message
(MIME structure, headers, attachment) and its DKIM signature, verified with
dkimpy against a key made here.
"""

from __future__ import annotations

import base64
import email
import email.policy
import gzip
import json
import re

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.tlsrpt.mail import (
    DKIM_SIGNED_HEADERS,
    build_report_message,
    load_dkim_key,
    mailto_addresses,
)
from mtasts_twisted.tlsrpt.report import ReportSettings
from tests.test_tlsrpt_report import (
    SETTINGS,
    assert_independent_parse,
    make_report,
    validate_report,
)

NOW = 1714611600.0  # 2024-05-02T01:00:00Z


def make_key():
    """A fresh RSA key: (PEM private key, DKIM TXT record with s=tlsrpt)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # RFC 8460 §3: the key record "must contain ... s=tlsrpt".
    return pem, b"v=DKIM1; k=rsa; s=tlsrpt; p=" + base64.b64encode(der)


_KEY, _RECORD = make_key()


def dns_for(record, name=b"sel1._domainkey.mail.sender.example."):
    """A dkimpy dnsfunc answering only C{name}."""
    asked = []

    def dnsfunc(qname, timeout=5):
        asked.append(qname)
        return record if qname == name else None

    dnsfunc.asked = asked
    return dnsfunc


SIGNING = ReportSettings(
    organization=SETTINGS.organization,
    submitter_domain=SETTINGS.submitter_domain,
    contact=SETTINGS.contact,
    from_address=SETTINGS.from_address,
    dkim_key_file="unused.pem",
    dkim_selector="sel1",
)


class MessageTests(SynchronousTestCase):
    def setUp(self):
        self.report = make_report()
        self.data = build_report_message(
            self.report, SETTINGS, "tlsrpt@example.net", now=NOW,
            message_id="m1@mail.sender.example",
        )
        self.msg = email.message_from_bytes(self.data, policy=email.policy.default)

    def test_crlf(self):
        """The message has CRLF line ends only, ready for SMTP DATA."""
        self.assertNotIn(b"\n", self.data.replace(b"\r\n", b""))
        self.assertTrue(all(len(line) <= 998 for line in self.data.split(b"\r\n")))

    def test_headers(self):
        """RFC 8460 §5.3 headers, Subject, and RFC 8689 TLS-Required: No."""
        msg = self.msg
        self.assertEqual(msg["From"], "tlsrpt-noreply@mail.sender.example")
        self.assertEqual(msg["To"], "tlsrpt@example.net")
        self.assertEqual(msg["Date"], "Thu, 02 May 2024 01:00:00 +0000")
        self.assertEqual(msg["Message-ID"], "<m1@mail.sender.example>")
        self.assertEqual(msg["TLS-Report-Domain"], "example.net")
        self.assertEqual(msg["TLS-Report-Submitter"], "mail.sender.example")
        self.assertEqual(msg["TLS-Required"], "No")
        self.assertEqual(msg["MIME-Version"], "1.0")
        subject = re.sub(r"\s+", " ", str(msg["Subject"]))
        # RFC 8460 §5.3 tlsrpt-subject ABNF.
        self.assertRegex(
            subject,
            r"\AReport Domain: example\.net Submitter: mail\.sender\.example"
            r" Report-ID: <[^<>@\s]+@[^<>@\s]+>\Z",
        )
        self.assertIn(f"<{self.report.report_id}>", subject)
        # The submitter matches contact-info's domain (§5.3 MUST).
        self.assertEqual(msg["TLS-Report-Submitter"], self.report.contact.split("@")[1])

    def test_mime_structure(self):
        """multipart/report; report-type="tlsrpt": a text part, then the gzip report."""
        msg = self.msg
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "tlsrpt")
        parts = list(msg.iter_parts())
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/plain", "application/tlsrpt+gzip"])
        text = parts[0].get_content()
        self.assertIn("example.net", text)
        self.assertIn(self.report.report_id, text)
        attachment = parts[1]
        self.assertEqual(attachment.get_content_disposition(), "attachment")
        self.assertEqual(attachment.get_filename(), self.report.filename)
        self.assertEqual(attachment["Content-Transfer-Encoding"], "base64")
        # The file name is one plain quoted parameter, not RFC 2231 pieces.
        self.assertIn(f'filename="{self.report.filename}"'.encode(), self.data)
        body = gzip.decompress(attachment.get_content())
        self.assertEqual(json.loads(body), self.report.to_json())
        validate_report(json.loads(body))
        assert_independent_parse(self, self.report, body)

    def test_base64_lines(self):
        """RFC 2045 §6.8: base64 lines are at most 76 characters."""
        body = self.data.split(b"Content-Transfer-Encoding: base64\r\n", 1)[1]
        lines = body.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0].split(b"\r\n")
        self.assertTrue(lines and all(0 < len(line) <= 76 for line in lines if line))

    def test_unsigned(self):
        """Without a key there is no DKIM-Signature."""
        self.assertIsNone(self.msg["DKIM-Signature"])


class DKIMTests(SynchronousTestCase):
    def sign(self, settings=SIGNING, key=_KEY):
        return build_report_message(
            make_report(), settings, "tlsrpt@example.net", now=NOW,
            message_id="m2@mail.sender.example", dkim_key=key,
        )

    def test_verifies(self):
        """The DKIM signature verifies with dkimpy (strict TLSRPT mode)."""
        data = self.sign()
        dnsfunc = dns_for(_RECORD)
        self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc, tlsrpt="strict"))
        self.assertEqual(dnsfunc.asked, [b"sel1._domainkey.mail.sender.example."])

    def test_signed_headers_no_length(self):
        """TLS-Report-Domain and -Submitter are signed; no l= tag."""
        data = self.sign()
        msg = email.message_from_bytes(data, policy=email.policy.default)
        tags = dict(
            (k.strip(), v.strip())
            for k, _, v in (t.partition("=") for t in re.sub(r"\s+", "", str(msg["DKIM-Signature"])).split(";"))
        )
        self.assertEqual(tags["d"], "mail.sender.example")
        self.assertEqual(tags["s"], "sel1")
        signed = tags["h"].split(":")
        self.assertIn("tls-report-domain", signed)
        self.assertIn("tls-report-submitter", signed)
        self.assertEqual(set(signed), {h.lower() for h in DKIM_SIGNED_HEADERS})
        self.assertNotIn("l", tags)

    def test_tampering_detected(self):
        """The signature covers the headers and the body."""
        data = self.sign()
        for old, new in [(b"TLS-Report-Domain: example.net", b"TLS-Report-Domain: example.org"),
                          (b"Failed sessions: 5", b"Failed sessions: 0")]:
            self.assertIn(old, data)
            self.assertFalse(dkim.verify(data.replace(old, new), dnsfunc=dns_for(_RECORD)))

    def test_wrong_key(self):
        """Another key's record does not verify it."""
        _, other_record = make_key()
        self.assertFalse(dkim.verify(self.sign(), dnsfunc=dns_for(other_record)))

    def test_load_key(self):
        """The key file is read; a file without a key is refused."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(_KEY)
        self.assertEqual(load_dkim_key(path), _KEY)
        with open(path, "wb") as f:
            f.write(b"not a key\n")
        self.assertRaises(ValueError, load_dkim_key, path)
        self.assertRaises(OSError, load_dkim_key, path + ".missing")

    def test_key_without_selector(self):
        """Signing needs a selector."""
        self.assertRaises(ValueError, self.sign, settings=SETTINGS)


class MailtoTests(SynchronousTestCase):
    def test_addresses(self):
        """mailto: rua give their addresses, percent-decoded, query ignored."""
        self.assertEqual(mailto_addresses("mailto:tlsrpt@example.net"), ["tlsrpt@example.net"])
        self.assertEqual(mailto_addresses("MAILTO:a%2Bb@example.net?subject=x"), ["a+b@example.net"])
        self.assertEqual(mailto_addresses("mailto:a@x.example%2Cb@y.example"),
                         ["a@x.example", "b@y.example"])

    def test_bad(self):
        """Other schemes and address-less URIs are refused."""
        for uri in ["https://x.example/", "mailto:", "mailto:nobody", "mailto:a%3Cb@x.example"]:
            self.assertRaises(ValueError, mailto_addresses, uri)


    def test_unicode_domain_alabel(self):
        """
        A U-label rua domain (percent-encoded UTF-8, RFC 6068 §2) comes back
        as A-labels, so that C{To:} holds a plain address and not an RFC 2047
        encoded-word, which is not allowed inside an address.
        """
        [address] = mailto_addresses("mailto:tlsrpt@b%C3%BCcher.example")
        self.assertEqual(address, "tlsrpt@xn--bcher-kva.example")
        data = build_report_message(
            make_report(), SETTINGS, address, now=NOW, message_id="m1@mail.sender.example")
        self.assertIn(b"\r\nTo: tlsrpt@xn--bcher-kva.example\r\n", data)
        self.assertNotIn(b"=?utf-8?", data.lower().split(b"\r\n\r\n", 1)[0])

    def test_bad_domain(self):
        """A rua domain that is no valid IDN is refused like any unusable address."""
        self.assertRaises(ValueError, mailto_addresses, "mailto:a@-bad-.example")

    def test_utf8_local_part(self):
        """
        A UTF-8 local part has no ASCII form: the header is written as UTF-8
        (RFC 6532 §3.2), never as an encoded-word, and parses back.
        """
        [address] = mailto_addresses("mailto:b%C3%BCro@b%C3%BCcher.example")
        self.assertEqual(address, "büro@xn--bcher-kva.example")
        data = build_report_message(
            make_report(), SETTINGS, address, now=NOW, message_id="m1@mail.sender.example")
        head = data.split(b"\r\n\r\n", 1)[0]
        self.assertIn("To: büro@xn--bcher-kva.example\r\n".encode("utf-8"), head)
        self.assertNotIn(b"=?utf-8?", head.lower())
        msg = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(msg["To"], "büro@xn--bcher-kva.example")
