"""
The arguments of the intake's commands, judged before anything is queued
or written into a header: L{check_line} (no control characters anywhere),
L{parse_helo}, L{parse_mail}, L{parse_rcpt}, and the C{Received:} line
built only from what they accepted (L{received_header}).

Each refusal is a L{Refusal} carrying the reply the intake sends (RFC 5321
§4.2.3 codes, RFC 3463 enhanced status codes):

============================================  =========================
What                                          Reply
============================================  =========================
a control character (CR, LF, NUL, TAB, ...)   C{501 5.5.2}
EHLO/HELO without a name, with several words  C{501 5.5.4}
or non-ASCII (RFC 6531 §3.7.1)
MAIL/RCPT not in the C{FROM:}/C{TO:} form     C{501 5.5.4}
a malformed path (RFC 5321 §4.1.2)            C{501 5.1.7} MAIL,
                                              C{501 5.1.3} RCPT
a path over RFC 5321 §4.5.3.1's sizes         the same, "path too long"
UTF-8 without the SMTPUTF8 parameter          C{550 5.6.7} MAIL,
                                              C{553 5.6.7} RCPT
                                              (RFC 6531 §3.5)
a recipient at an address literal             C{553 5.1.2}
an unknown or unsupported parameter           C{555 5.5.4} (§4.1.1.11)
a bad value of a known parameter              C{501 5.5.4}
C{REQUIRETLS} outside a TLS session           C{530 5.7.10} (RFC 8689 §2;
                                              RFC 3207 §4's 530, RFC
                                              8689 §4.2.1's 5.7.10)
============================================  =========================
"""

from __future__ import annotations

import re

import attrs

from mtasts_twisted.delivery.mailbox import (
    Mailbox,
    MailboxError,
    is_domain,
    parse_address_literal,
    parse_path,
)
from mtasts_twisted.policy import DomainError, is_address_literal, to_alabel

__all__ = [
    "Greeting",
    "MailCommand",
    "Refusal",
    "check_line",
    "parse_helo",
    "parse_mail",
    "parse_rcpt",
    "received_header",
]

# RFC 5321 §4.1.2 forbids them in commands; a CR or LF inside a line would
# end a header line where the argument is copied (issue: EHLO injection).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_FROM = re.compile(r"FROM:", re.IGNORECASE)
_TO = re.compile(r"TO:", re.IGNORECASE)
# RFC 5321 §4.1.2 esmtp-keyword and esmtp-value (RFC 6531 §3.3 adds UTF-8).
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(r"[^\x00-\x20=\x7f]+\Z")


class Refusal(Exception):
    """
    A command refused: the reply to send.

    @ivar code: the reply code.
    @ivar text: the reply text, starting with its enhanced status code.
    """

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def check_line(line: bytes) -> None:
    """
    Refuse a command line with a control character (C{501 5.5.2}): a bare
    CR or LF, NUL, TAB, ESC, DEL.  RFC 5321 §2.3.8 and §4.1.2.
    """
    if _CONTROL.search(line):
        raise Refusal(501, "5.5.2 Syntax error: control character in command")


@attrs.frozen
class Greeting:
    """
    An accepted EHLO or HELO.

    @ivar name: the argument as the client wrote it (printable ASCII, one word).
    @ivar domain: C{name} when it is a domain or an address literal (RFC
        5321 §4.1.1.1), else L{None}: only then is it written into
        C{Received:}.
    @ivar esmtp: EHLO (not HELO).
    """

    name: str
    domain: str | None
    esmtp: bool


def parse_helo(rest: bytes, esmtp: bool) -> Greeting:
    """
    Judge the argument of EHLO (C{esmtp}) or HELO.

    @raise Refusal: none, several words, or not ASCII (RFC 6531 §3.7.1: a
        client sends only LDH labels or A-labels in EHLO).
    """
    check_line(rest)
    verb = "EHLO" if esmtp else "HELO"
    text = rest.strip(b" ")
    if not text:
        raise Refusal(501, f"5.5.4 Syntax: {verb} domain")  # RFC 5321 §4.1.1.1
    if not text.isascii() or b" " in text:
        raise Refusal(501, f"5.5.4 Syntax: {verb} domain (one ASCII name)")
    name = text.decode("ascii")
    domain: str | None = None
    if name.startswith("["):
        try:
            domain = parse_address_literal(name)
        except MailboxError:
            domain = None
    elif is_domain(name.rstrip(".")):
        domain = name.rstrip(".")
    return Greeting(name, domain, esmtp)


@attrs.frozen
class MailCommand:
    """
    An accepted MAIL FROM.

    @ivar sender: the reverse-path, L{None} for C{<>}.
    @ivar size: the declared C{SIZE=} (RFC 1870), if any.
    @ivar smtputf8: the C{SMTPUTF8} parameter was given (RFC 6531 §3.4).
    @ivar requiretls: the C{REQUIRETLS} parameter was given (RFC 8689 §2,
        §4.1: the message is tagged with it).
    """

    sender: Mailbox | None
    size: int | None = None
    smtputf8: bool = False
    requiretls: bool = False


def _decode(rest: bytes, what: str) -> str:
    try:
        return rest.decode("utf-8")
    except UnicodeDecodeError:
        if what == "MAIL":
            raise Refusal(501, "5.1.7 Bad sender address syntax: not UTF-8") from None
        raise Refusal(501, "5.1.3 Bad recipient address syntax: not UTF-8") from None


def _parameters(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue
        keyword, eq, value = word.partition("=")
        if not _KEYWORD.match(keyword) or (eq and not _VALUE.match(value)):
            raise Refusal(501, f"5.5.4 Bad parameter {word[:40]!r}")
        if keyword.upper() in params:
            raise Refusal(501, f"5.5.4 Parameter {keyword.upper()} given twice")
        params[keyword.upper()] = value if eq else None
    return params


def _path_refusal(error: MailboxError, mail: bool) -> Refusal:
    if error.utf8:
        # RFC 6531 §3.5: 550 for MAIL, 553 for RCPT, X.6.7 for both.
        code = 550 if mail else 553
        return Refusal(code, "5.6.7 Non-ASCII address without the SMTPUTF8 parameter (RFC 6531)")
    status = "5.1.7 Bad sender" if mail else "5.1.3 Bad recipient"
    if error.too_long:
        return Refusal(501, f"{status} address: path too long ({error})")  # RFC 5321 §4.5.3.1.10
    return Refusal(501, f"{status} address syntax: {error}")


def parse_mail(rest: bytes, size_limit: int, tls: bool = False) -> MailCommand:
    """
    Judge the argument of MAIL (RFC 5321 §4.1.1.2): the reverse-path and
    the parameters this intake offers: C{SIZE} (RFC 1870), C{BODY=7BIT} or
    C{8BITMIME} (RFC 6152), C{SMTPUTF8} (RFC 6531), C{REQUIRETLS} (RFC
    8689, in a TLS session only).

    @param size_limit: the largest C{SIZE=} accepted (C{552 5.3.4} above).
    @param tls: the session is under TLS (STARTTLS done).
    @raise Refusal: see the module docstring.
    """
    check_line(rest)
    text = _decode(rest, "MAIL")
    if not _FROM.match(text):
        raise Refusal(501, "5.5.4 Syntax: MAIL FROM:<address>")
    # The parameters decide whether UTF-8 is allowed in the path: read the
    # path without that limit first, then judge it.
    try:
        sender, rest_text = parse_path(text[5:], utf8=True, null=True)
    except MailboxError as e:
        raise _path_refusal(e, mail=True) from None
    params = _parameters(rest_text)
    size: int | None = None
    smtputf8 = False
    requiretls = False
    for keyword, value in params.items():
        if keyword == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise Refusal(501, "5.5.4 Syntax: SIZE=<octets>")
            size = int(value)
        elif keyword == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise Refusal(501, "5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise Refusal(501, "5.5.4 SMTPUTF8 takes no value")  # RFC 6531 §3.4
            smtputf8 = True
        elif keyword == "REQUIRETLS":
            if value is not None:
                raise Refusal(501, "5.5.4 REQUIRETLS takes no value")  # RFC 8689 §2 item 4
            if not tls:
                # RFC 8689 §2: "The session itself MUST employ TLS transmission."
                raise Refusal(530, "5.7.10 REQUIRETLS needs a TLS session: send STARTTLS first (RFC 8689)")
            requiretls = True
        else:
            raise Refusal(555, f"5.5.4 Unsupported parameter {keyword}")  # RFC 5321 §4.1.1.11
    if sender is not None and sender.utf8 and not smtputf8:
        raise _path_refusal(MailboxError("non-ASCII", utf8=True), mail=True)
    if size is not None and size > size_limit:
        raise Refusal(552, "5.3.4 Message size exceeds fixed maximum message size")  # RFC 1870 §6.2
    return MailCommand(sender, size, smtputf8, requiretls)


def parse_rcpt(rest: bytes, smtputf8: bool) -> Mailbox:
    """
    Judge the argument of RCPT (RFC 5321 §4.1.1.3): a mailbox at a domain
    this relay can deliver to (never an address literal, which has no MX
    and no MTA-STS policy), and no parameters (none are offered).

    @param smtputf8: the transaction's MAIL had the SMTPUTF8 parameter.
    @raise Refusal: see the module docstring.
    """
    check_line(rest)
    text = _decode(rest, "RCPT")
    if not _TO.match(text):
        raise Refusal(501, "5.5.4 Syntax: RCPT TO:<address>")
    try:
        recipient, rest_text = parse_path(text[3:], utf8=smtputf8)
    except MailboxError as e:
        raise _path_refusal(e, mail=False) from None
    assert recipient is not None  # null=False
    params = _parameters(rest_text)
    if params:
        raise Refusal(555, f"5.5.4 Unsupported parameter {next(iter(params))}")  # RFC 5321 §4.1.1.11
    if recipient.is_literal or is_address_literal(recipient.domain):
        raise Refusal(553, "5.1.2 Address literals are not relayed")
    try:
        to_alabel(recipient.domain)  # what delivery will look up
    except DomainError as e:
        raise Refusal(501, f"5.1.3 Bad recipient address syntax: {e}") from None
    return recipient


def received_header(
    greeting: Greeting, client: str, by: str, tls: bool, smtputf8: bool, date: str
) -> bytes:
    """
    The C{Received:} line (RFC 5321 §4.4) of one message, built from
    validated values only: the EHLO name when it is a domain or address
    literal (else the client's address literal), the client's IP address,
    our name, the protocol (RFC 3848; RFC 6531 §4.3 for SMTPUTF8).  No
    C{for} clause: several recipients share the copy.

    @param client: the client's IP address (text of an C{ipaddress} value).
    """
    literal = f"[IPv6:{client}]" if ":" in client else f"[{client}]"
    origin = greeting.domain or literal
    if not greeting.esmtp:
        proto = "SMTP"
    elif smtputf8:
        proto = "UTF8SMTPS" if tls else "UTF8SMTP"
    else:
        proto = "ESMTPS" if tls else "ESMTP"
    if not is_domain(by):
        by = "localhost"
    text = f"Received: from {origin} ({literal})\r\n\tby {by} with {proto} (mtasts-twisted);\r\n\t{date}"
    return text.encode("ascii")
