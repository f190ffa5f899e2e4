"""
Delivery status notifications (RFC 3464, RFC 3461 §6, status codes from
RFC 3463): pure functions that build the bytes of a DSN.

A DSN is a C{multipart/report; report-type=delivery-status} message
(RFC 6522) with three parts: a human-readable explanation, a
C{message/delivery-status} part (one per-message block, then one
per-recipient block per failed recipient) and the original message's
header as C{text/rfc822-headers}: never the body, whatever C{RET} asked
(as RFC 8689 §5 requires of a REQUIRETLS message's DSN: "as if RET=HDRS
was present"; this intake offers no DSN extension, so no RET=FULL is
ever asked).  It is sent with the null envelope
sender (C{MAIL FROM:<>}, RFC 5321 §4.5.5) so that it never causes another
DSN; L{needs_dsn} tells the caller whether a sender may get one at all.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from email.utils import formatdate
from typing import BinaryIO, Protocol

__all__ = [
    "DSN_KINDS",
    "FailedRecipient",
    "build_dsn",
    "needs_dsn",
    "read_headers",
    "status_code_of",
]

#: The kinds of DSN built here: RFC 3464 §2.3.3 Action values.
DSN_KINDS = ("failed", "delayed")
#: Most octets of the original header included in a DSN.
MAX_HEADER_BYTES = 64 * 1024

#: (recipient, RFC 3463 status like "5.7.1", diagnostic text, remote MTA or None)
FailedRecipient = tuple[str, str, str, "str | None"]

_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_LEADING_STATUS_RE = re.compile(r"^\s*(?:(\d{3})[ -])?\s*([245]\.\d{1,3}\.\d{1,3})\b")
_REPLY_RE = re.compile(r"^[245]\d\d\b")


class _Envelope(Protocol):
    """What a DSN needs of a queued message (read-only, e.g. a frozen value)."""

    @property
    def id(self) -> str: ...

    @property
    def sender(self) -> str: ...

    @property
    def created(self) -> float: ...


def needs_dsn(sender: str) -> bool:
    """
    Whether a failure of a message from C{sender} is reported with a DSN:
    never for the null sender (RFC 5321 §4.5.5, RFC 3464 §1: DSNs and
    bounces have it, and must not cause more of them).
    """
    return sender.strip() not in ("", "<>")


def status_code_of(code: int | None, message: str, default: str = "4.0.0") -> str:
    """
    The RFC 3463 status code of an outcome: the enhanced code at the
    start of C{message} (after an optional reply code), else the class of
    the SMTP reply C{code} (C{X.0.0}), else C{default}.
    """
    m = _LEADING_STATUS_RE.match(message or "")
    if m and (code is None or m.group(2)[0] == str(code)[0]):
        return m.group(2)
    if code is not None and 200 <= code < 600:
        return f"{code // 100}.0.0"
    return default


def read_headers(body: BinaryIO, limit: int = MAX_HEADER_BYTES) -> bytes:
    """
    Read the header of a message (up to the first empty line, at most
    C{limit} octets, whole lines) from the start of C{body}.
    """
    body.seek(0)
    out = bytearray()
    while len(out) < limit:
        line = body.readline(limit - len(out))
        if not line or line in (b"\r\n", b"\n"):
            break
        out += line
    return bytes(out)


def _xtext_safe(value: str) -> str:
    # Header field values must not break the structure: no line breaks.
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _address_type(address: str) -> str:
    # RFC 3464 §2.3.2: address-type "rfc822"; RFC 6533 "utf-8" otherwise.
    return "rfc822" if address.isascii() else "utf-8"


def build_dsn(
    queued_message: _Envelope,
    failed_recipients: Sequence[FailedRecipient],
    reporting_mta: str,
    kind: str = "failed",
    original_headers: bytes = b"",
    date: float | None = None,
) -> bytes:
    """
    Build a DSN about C{queued_message} for C{failed_recipients}.

    @param queued_message: has C{id}, C{sender} (who gets the DSN) and
        C{created} (the Arrival-Date).
    @param failed_recipients: C{(recipient, status, diagnostic, remote_mta)}:
        C{status} an RFC 3463 code (C{"5.7.1"}); C{diagnostic} the reason,
        reported as C{Diagnostic-Code: smtp; ...} when it starts with an
        SMTP reply code, else as C{X-mtasts-twisted; ...}; C{remote_mta} the
        MX host name or L{None}.
    @param reporting_mta: this relay's host name (C{Reporting-MTA: dns; ...}).
    @param kind: C{"failed"} (given up) or C{"delayed"} (still trying).
    @param original_headers: the original header, included as
        C{text/rfc822-headers} (RFC 3462/6522); see L{read_headers}.
    @param date: POSIX time for the C{Date} header (now when L{None}).
    @return: the message, CRLF line ends, ready to be queued with the null
        sender to C{queued_message.sender}.
    """
    if kind not in DSN_KINDS:
        raise ValueError(f"kind must be one of {DSN_KINDS}, not {kind!r}")
    if not failed_recipients:
        raise ValueError("a DSN needs at least one recipient")
    for _, status, _, _ in failed_recipients:
        if not _STATUS_RE.match(status):
            raise ValueError(f"not an RFC 3463 status code: {status!r}")
    reporting_mta = _xtext_safe(reporting_mta)
    sender = _xtext_safe(queued_message.sender)
    boundary = f"=_mtasts_{secrets.token_hex(12)}"
    message_id = f"<{queued_message.id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>"

    if kind == "failed":
        subject = "Undelivered Mail Returned to Sender"
        intro = (
            f"This is the mail system at host {reporting_mta}.\r\n\r\n"
            "Your message could not be delivered to one or more recipients.\r\n"
            "It has been given up on; the reasons are below.\r\n"
        )
    else:
        subject = "Delayed Mail (still being retried)"
        intro = (
            f"This is the mail system at host {reporting_mta}.\r\n\r\n"
            "Your message could not be delivered yet to one or more recipients.\r\n"
            "This is a warning only: delivery is still being retried.\r\n"
        )
    human = intro + "\r\n"
    for recipient, status, diagnostic, remote in failed_recipients:
        human += f"<{_xtext_safe(recipient)}>: {_xtext_safe(diagnostic)}"
        if remote:
            human += f" (host {_xtext_safe(remote)})"
        human += f" [{status}]\r\n"

    # RFC 3464 §2.2: per-message fields.
    status_lines = [
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-mtasts-twisted-Queue-ID: {queued_message.id}",
        f"Arrival-Date: {formatdate(queued_message.created)}",
        "",
    ]
    # RFC 3464 §2.3: per-recipient fields, blocks separated by empty lines.
    for recipient, status, diagnostic, remote in failed_recipients:
        recipient = _xtext_safe(recipient)
        diagnostic = _xtext_safe(diagnostic)
        status_lines.append(f"Final-Recipient: {_address_type(recipient)}; {recipient}")
        status_lines.append(f"Action: {kind}")
        status_lines.append(f"Status: {status}")
        if remote:
            status_lines.append(f"Remote-MTA: dns; {_xtext_safe(remote)}")
        if diagnostic:
            dtype = "smtp" if _REPLY_RE.match(diagnostic) else "X-mtasts-twisted"
            status_lines.append(f"Diagnostic-Code: {dtype}; {diagnostic}")
        status_lines.append("")
    delivery_status = "\r\n".join(status_lines)

    headers = _crlf(original_headers[:MAX_HEADER_BYTES])
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"

    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
        f"To: <{sender}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(date)}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Auto-Submitted: auto-replied\r\n"  # RFC 3834 §5
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{human}"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        f"{delivery_status}"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        "\r\n"
    )
    tail = f"\r\n--{boundary}--\r\n"
    return head.encode("utf-8") + headers + tail.encode("ascii")
