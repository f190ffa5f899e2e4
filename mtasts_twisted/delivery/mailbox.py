"""
The mailbox syntax of SMTP (RFC 5321 §4.1.2, widened to UTF-8 by RFC 6531
§3.3), used by the relay's intake to judge what a client gives in MAIL and
RCPT, and by delivery to write what it sends (L{wire_address
<mtasts_twisted.delivery.protocol.wire_address>}).

  - L{parse_path}: the argument of MAIL FROM / RCPT TO up to the
    parameters: C{<local@domain>} (a source route before it is dropped,
    RFC 5321 §4.1.1.3), the null path C{<>}, or a bare mailbox.
  - L{parse_mailbox}: C{local@domain} as stored in a queue envelope.
  - L{Mailbox}: the parsed value; C{str()} gives its canonical text, the
    local part with the least quoting (RFC 5321 §4.1.2).

Nothing here accepts a control character (RFC 5321 §4.1.2: they MUST NOT
be used in MAIL or RCPT), so no address can carry a line break into a
command or a header.  Sizes are those of RFC 5321 §4.5.3.1: local part 64
octets, domain 255, path 256 (with its angle brackets), counted in the
octets of the UTF-8 form.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

import attrs

from mtasts_twisted.policy import DomainError, to_alabel

__all__ = [
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "Mailbox",
    "MailboxError",
    "is_domain",
    "parse_address_literal",
    "parse_mailbox",
    "parse_path",
    "quote_local_part",
]

#: RFC 5321 §4.5.3.1.1: octets of a local part at most.
MAX_LOCAL_PART = 64
#: RFC 5321 §4.5.3.1.2: octets of a domain at most.
MAX_DOMAIN = 255
#: RFC 5321 §4.5.3.1.3: octets of a path at most, "<" and ">" included.
MAX_PATH = 256

# RFC 5322 §3.2.3 atext, as RFC 5321 §4.1.2 imports it.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
# RFC 5321 §4.1.2 sub-domain = Let-dig [Ldh-str]
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
# RFC 5321 §4.1.3 General-address-literal = Standardized-tag ":" 1*dcontent
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+\Z")


class MailboxError(ValueError):
    """
    Text that is no RFC 5321 mailbox (or path).

    @ivar too_long: the syntax is right but a part is over its RFC 5321
        §4.5.3.1 size ("501 Path too long").
    @ivar utf8: it has non-ASCII characters where they were not allowed
        (RFC 6531 §3.5: C{5.6.7}).
    """

    def __init__(self, message: str, too_long: bool = False, utf8: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long
        self.utf8 = utf8


@attrs.frozen
class Mailbox:
    """
    An RFC 5321 mailbox.

    @ivar local: the local part's value: quotes and quoting backslashes
        removed (C{a b} for C{"a b"}).
    @ivar domain: the domain as written (U-labels kept), or an address
        literal with its brackets (C{[192.0.2.1]}).
    """

    local: str
    domain: str

    @property
    def is_literal(self) -> bool:
        """Whether the domain is an address literal (RFC 5321 §4.1.3)."""
        return self.domain.startswith("[")

    @property
    def utf8(self) -> bool:
        """Whether it has a non-ASCII character (it needs SMTPUTF8, RFC 6531)."""
        return not (self.local.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        return f"{quote_local_part(self.local)}@{self.domain}"


def _show(text: str) -> str:
    """C{text} for an error message: quoted, and cut (replies are short, RFC 5321 §4.5.3.1.5)."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _non_ascii_ok(char: str) -> bool:
    # RFC 6531 §3.3: atext and qtextSMTP =/ UTF8-non-ascii; never a control
    # character (C1 controls included, RFC 5321 §4.1.2 in spirit).
    return unicodedata.category(char) != "Cc"


def _is_dot_string(value: str) -> bool:
    """RFC 5321 §4.1.2 Dot-string = Atom *("." Atom), Atom = 1*atext."""
    if not value:
        return False
    for atom in value.split("."):
        if not atom:
            return False
        for char in atom:
            if char not in _ATEXT and (char.isascii() or not _non_ascii_ok(char)):
                return False
    return True


def quote_local_part(value: str) -> str:
    """
    A local part's value as written in a path: a Dot-string as is, anything
    else as a Quoted-string with only C{"} and C{\\} escaped (RFC 5321
    §4.1.2: the sender SHOULD use the least quoting possible).
    """
    if _is_dot_string(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _qtext(char: str) -> bool:
    # RFC 5321 §4.1.2 qtextSMTP = %d32-33 / %d35-91 / %d93-126
    if char.isascii():
        return 32 <= ord(char) <= 126 and char not in '"\\'
    return _non_ascii_ok(char)


def _scan_quoted(text: str, start: int) -> tuple[str, int]:
    """The value of the Quoted-string at C{text[start]} (a C{"}) and the index after it."""
    value: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == '"':
            return "".join(value), i + 1
        if char == "\\":
            # RFC 5321 §4.1.2 quoted-pairSMTP = %d92 %d32-126
            if i + 1 >= len(text) or not 32 <= ord(text[i + 1]) <= 126:
                raise MailboxError("bad quoted pair in the local part")
            value.append(text[i + 1])
            i += 2
            continue
        if not _qtext(char):
            raise MailboxError(f"character {char!r} not allowed in a quoted local part")
        value.append(char)
        i += 1
    raise MailboxError("unterminated quoted local part")


def is_domain(name: str, utf8: bool = False) -> bool:
    """
    Whether C{name} is an RFC 5321 §4.1.2 C{Domain} (LDH labels; with
    C{utf8}, U-labels too, RFC 6531 §3.3, judged by IDNA 2008), within
    RFC 5321 §4.5.3.1.2's 255 octets.
    """
    if not name or len(name.encode("utf-8")) > MAX_DOMAIN:
        return False
    if name.isascii():
        return all(_LDH_LABEL.match(label) for label in name.split("."))
    if not utf8:
        return False
    for label in name.split("."):
        if label.isascii() and not _LDH_LABEL.match(label):
            return False
    try:
        to_alabel(name)
    except DomainError:
        return False
    # UTS 46 would map a full stop look-alike into a dot: not in an address.
    return not any(char in name for char in "\u3002\uff0e\uff61")


def parse_address_literal(text: str) -> str:
    """
    Check an address literal (RFC 5321 §4.1.3: C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]} or a General-address-literal); return it.

    @raise MailboxError: for anything else.
    """
    if not (text.startswith("[") and text.endswith("]")):
        raise MailboxError(f"not an address literal: {_show(text)}")
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise MailboxError(f"bad IPv6 address literal {_show(text)}") from None
        return text
    if re.fullmatch(r"[0-9.]+", inner):
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            raise MailboxError(f"bad IPv4 address literal {_show(text)}") from None
        return text
    if _GENERAL_LITERAL.match(inner) and not inner.lower().startswith("ipv6:"):
        return text
    raise MailboxError(f"bad address literal {_show(text)}")


def parse_mailbox(text: str, utf8: bool = True) -> Mailbox:
    """
    Parse C{local@domain} (RFC 5321 §4.1.2 C{Mailbox}).

    @param utf8: whether non-ASCII characters are allowed (RFC 6531).
    @raise MailboxError: for anything else.
    """
    if not utf8 and not text.isascii():
        raise MailboxError("non-ASCII address", utf8=True)
    if text.startswith('"'):
        local, end = _scan_quoted(text, 0)
        if text[end : end + 1] != "@":
            raise MailboxError("the quoted local part must be followed by @")
        local_written = text[:end]
    else:
        local_written, at, _ = text.partition("@")
        if not at:
            raise MailboxError("address without @domain")
        if not _is_dot_string(local_written):
            raise MailboxError(f"bad local part {_show(local_written)}")
        local = local_written
        end = len(local_written)
    domain = text[end + 1 :]
    if len(quote_local_part(local).encode("utf-8")) > MAX_LOCAL_PART:
        raise MailboxError(f"local part longer than {MAX_LOCAL_PART} octets", too_long=True)
    if domain.startswith("["):
        parse_address_literal(domain)
    elif len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise MailboxError(f"domain longer than {MAX_DOMAIN} octets", too_long=True)
    elif not is_domain(domain, utf8):
        raise MailboxError(f"bad domain {_show(domain)}")
    return Mailbox(local, domain)


def _scan_path(text: str) -> tuple[str, int]:
    """The text between C{<} and its C{>} (a quoted C{>} is no end), and the index after."""
    i = 1
    while i < len(text):
        char = text[i]
        if char == '"':
            _, i = _scan_quoted(text, i)
            continue
        if char == ">":
            return text[1:i], i + 1
        i += 1
    raise MailboxError("path without its closing >")


def _drop_source_route(path: str) -> str:
    """RFC 5321 §4.1.1.3 and Appendix C: accept A-d-l and ignore it."""
    if not path.startswith("@"):
        return path
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise MailboxError("source route without :")
    for hop in route.split(","):
        if not hop.startswith("@") or not is_domain(hop[1:]):
            raise MailboxError(f"bad source route {_show(route)}")
    return mailbox


def parse_path(argument: str, utf8: bool = True, null: bool = False) -> tuple[Mailbox | None, str]:
    """
    Parse the path at the start of a MAIL FROM: or RCPT TO: argument.

    @param argument: the text after the colon (spaces before the path are
        tolerated).
    @param utf8: whether non-ASCII characters are allowed (RFC 6531).
    @param null: whether the null path C{<>} is allowed (MAIL only).
    @return: the mailbox (L{None} for C{<>}) and the rest of the argument
        (the parameters, with their leading space).
    @raise MailboxError: no path, a malformed one, one over a size limit.
    """
    text = argument.lstrip(" ")
    if text.startswith("<"):
        inner, end = _scan_path(text)
    else:
        # A path without angle brackets (RFC 821 clients): up to a space.
        end = 0
        while end < len(text) and text[end] != " ":
            if text[end] == '"':
                _, end = _scan_quoted(text, end)
            else:
                end += 1
        inner = text[:end]
    rest = text[end:]
    if rest and not rest.startswith(" "):
        raise MailboxError("junk after the path")
    if inner == "":
        if null and text.startswith("<"):
            return None, rest
        raise MailboxError("empty path")
    if len(inner.encode("utf-8")) + 2 > MAX_PATH:
        raise MailboxError(f"path longer than {MAX_PATH} octets", too_long=True)
    return parse_mailbox(_drop_source_route(inner), utf8), rest
