"""
TLSRPT reports as mail messages for C{mailto:} rua URIs (RFC 8460 §5.3).

L{build_report_message} makes (does not send) the message: a
C{multipart/report; report-type="tlsrpt"} with a human-readable
C{text/plain} part and the gzip-compressed report as an
C{application/tlsrpt+gzip} attachment named per §5.1; the §5.3 headers; and,
when a key is given, a DKIM signature made with dkimpy (RFC 8460 §3: "Reports
sent via SMTP MUST contain a valid DKIM signature").

Sending is the caller's: the scheduler hands the bytes to a C{send_mail}
callable (see L{SendMail}).
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import urllib.parse
from collections.abc import Callable
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart

from twisted.internet.defer import Deferred

from mtasts_twisted.policy import DomainError, to_alabel
from mtasts_twisted.tlsrpt.report import GZIP_MEDIA_TYPE, Report, ReportSettings

__all__ = [
    "DKIM_SIGNED_HEADERS",
    "SendMail",
    "build_report_message",
    "load_dkim_key",
    "mailto_addresses",
]

#: C{send_mail(sender, recipient, message_bytes) -> Deferred}: delivers one
#: message to one recipient, firing on acceptance by the next hop and
#: failing otherwise.  RFC 8460 §5.3: it must deliver despite MTA-STS or
#: DANE failures, and its own sessions should not be reported (§3).
SendMail = Callable[[str, str, bytes], "Deferred[object]"]

#: Headers covered by the DKIM signature.  RFC 8460 §5.3: TLS-Report-Domain
#: and TLS-Report-Submitter "SHOULD be included in the DKIM signature".
DKIM_SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "TLS-Report-Domain",
    "TLS-Report-Submitter",
    "TLS-Required",
)

# CRLF line ends for SMTP; long lines allowed so the §5.1 file name stays one
# quoted parameter (the 78-column default would split it per RFC 2231).
_POLICY = email_policy.SMTP.clone(max_line_length=998)
_UTF8_POLICY = _POLICY.clone(utf8=True)


def load_dkim_key(path: str) -> bytes:
    """
    Read a DKIM private key (PEM, RSA or Ed25519 as dkimpy takes).

    Blocking, meant for start-up: the scheduler reads it once.

    @param path: the key file.
    @return: its bytes.
    @raise OSError: the file cannot be read.
    @raise ValueError: it holds no PEM private key.
    """
    with open(path, "rb") as f:
        key = f.read()
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"{path}: no PEM private key in it")
    return key


def mailto_addresses(uri: str) -> list[str]:
    """
    Return the addresses of a C{mailto:} URI (RFC 6068; query ignored).

    @param uri: e.g. C{mailto:tlsrpt@example.com}.
    @return: the addresses, percent-decoded (one URI may name several,
        separated by an encoded comma).
    @raise ValueError: not a C{mailto:} URI, or no address in it.
    """
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme.lower() != "mailto":
        raise ValueError(f"not a mailto: URI: {uri!r}")
    to = urllib.parse.unquote(rest.partition("?")[0])
    addresses = [a.strip() for a in to.split(",") if a.strip()]
    if not addresses or any("@" not in a or any(c in a for c in "<>\r\n ") for a in addresses):
        raise ValueError(f"no usable address in {uri!r}")
    return [_alabel_address(a, uri) for a in addresses]


def _alabel_address(address: str, uri: str) -> str:
    """
    Write the domain of C{address} as A-labels.

    A U-label domain in a C{To:} header would be written as an RFC 2047
    encoded-word, which is not allowed inside an address (RFC 2047 §5), and
    would need SMTPUTF8 in C{RCPT TO}; its A-label form needs neither.  A
    non-ASCII local part has no such form: the message then goes out as an
    internationalised message (RFC 6532), see L{build_report_message}.
    """
    local, _, domain = address.rpartition("@")
    try:
        return f"{local}@{to_alabel(domain)}"
    except DomainError as e:
        raise ValueError(f"no usable address in {uri!r}: {e}") from None


def _text(report: Report) -> str:
    return (
        f"This is an aggregate TLS report (RFC 8460) from {report.organization}"
        f" ({report.submitter}).\r\n"
        "\r\n"
        f"Policy domain: {report.policy_domain}\r\n"
        f"Period: {report.day} 00:00:00 to 23:59:59 UTC\r\n"
        f"Successful sessions: {report.success_count}\r\n"
        f"Failed sessions: {report.failure_count}\r\n"
        f"Report-ID: {report.report_id}\r\n"
        f"Contact: {report.contact}\r\n"
        "\r\n"
        f"The report is attached as {report.filename}.\r\n"
    )


def build_report_message(
    report: Report,
    settings: ReportSettings,
    recipient: str,
    *,
    now: float,
    message_id: str,
    dkim_key: bytes | None = None,
) -> bytes:
    """
    Make the RFC 8460 §5.3 message carrying C{report}.

    @param report: the report.
    @param settings: supply C{From} and the DKIM selector and domain.
    @param recipient: the C{To} address (one of L{mailto_addresses}).
    @param now: POSIX seconds for the C{Date} header.
    @param message_id: the C{Message-ID} without angle brackets
        (C{unique@domain}).
    @param dkim_key: a PEM private key (L{load_dkim_key}) to DKIM-sign with
        C{settings.dkim_selector}, or L{None} for no signature.
    @return: the message, CRLF line ends, ready for SMTP C{DATA}.
    @raise ImportError: C{dkim_key} given but dkimpy is not installed
        (C{pip install mtasts-twisted[dkim]}).
    """
    # RFC 6532 §3.2: an address that is not ASCII (a UTF-8 local part) is
    # written as UTF-8 in the header, never as an encoded-word.
    policy = _POLICY if recipient.isascii() and settings.from_address.isascii() else _UTF8_POLICY
    msg = EmailMessage(policy=policy)
    msg["From"] = settings.from_address
    msg["To"] = recipient
    msg["Date"] = email.utils.format_datetime(
        datetime.datetime.fromtimestamp(now, datetime.UTC)
    )
    msg["Message-ID"] = f"<{message_id}>"
    # RFC 8460 §5.3: "Report Domain: <domain> Submitter: <domain>
    # Report-ID: <id-left@id-right>".
    msg["Subject"] = report.subject
    # RFC 8460 §5.3: these two headers "MUST be included".
    msg["TLS-Report-Domain"] = report.policy_domain
    msg["TLS-Report-Submitter"] = report.submitter
    # RFC 8689 §5: deliver even where TLS policies fail (RFC 8460 §5.3:
    # reports MUST be delivered "despite any TLS-related failures").
    msg["TLS-Required"] = "No"
    msg["Auto-Submitted"] = "auto-generated"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = 'multipart/report; report-type="tlsrpt"'

    text = MIMEPart(policy=_POLICY)
    text.set_content(_text(report), charset="us-ascii", cte="7bit")

    attachment = MIMEPart(policy=_POLICY)
    # RFC 8460 §5.3: "application/tlsrpt+gzip" when compressed; file name
    # per §5.1.  Base64 lines wrapped at 76 (RFC 2045 §6.8).
    attachment["Content-Type"] = GZIP_MEDIA_TYPE
    attachment["Content-Transfer-Encoding"] = "base64"
    attachment["Content-Disposition"] = f'attachment; filename="{report.filename}"'
    attachment.set_payload(base64.encodebytes(report.gzip_bytes()).decode("ascii"))

    msg.set_payload([text, attachment])
    msg.set_boundary(f"tlsrpt-{report.unique}")
    data = msg.as_bytes(policy=policy)
    if dkim_key is None:
        return data
    if settings.dkim_selector is None:
        raise ValueError("a DKIM key was given but no selector is configured")
    return _dkim_sign(data, settings, dkim_key)


def _dkim_sign(data: bytes, settings: ReportSettings, key: bytes) -> bytes:
    import dkim

    assert settings.dkim_selector is not None
    signature = dkim.sign(
        data,
        settings.dkim_selector.encode("ascii"),
        settings.signing_domain.encode("ascii"),
        key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[h.lower().encode("ascii") for h in DKIM_SIGNED_HEADERS],
        # RFC 8460 §3: "DKIM signatures must not use the l= attribute".
        length=False,
        tlsrpt=True,
    )
    return signature + data
