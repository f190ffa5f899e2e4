"""
Names and addresses as a lookup takes them: text (A- or U-labels) to an
absolute, lower-case, A-label C{dns.name.Name} and back, record types as
text, and IP literals (answered without DNS).
"""

from __future__ import annotations

import functools
import ipaddress

import dns.exception
import dns.name
import dns.rdatatype
import idna

from mtasts_twisted.policy import DomainError


def _is_ipv6(host: str) -> bool:
    return ":" in host


def _ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    # A host name is neither IPv6 (a colon) nor IPv4 (a final digit: no TLD
    # is numeric): skip the costly parse for the usual case.
    if ":" not in value and not value[-1:].isdigit():
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _to_dns_name(name: str | bytes) -> dns.name.Name:
    """
    Turn a name into an absolute, lower-case, A-label L{dns.name.Name}.

    Labels are converted one by one so that underscore labels
    (C{_mta-sts}, C{_smtp._tls}) pass while U-labels get IDNA 2008 (UTS 46).
    """
    return _to_dns_name_and_text(name)[0]


#: Characters of a name whose text form needs no escaping (RFC 1035 §5.1).
_PLAIN_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _to_dns_name_and_text(name: str | bytes) -> tuple[dns.name.Name, str]:
    """
    L{_to_dns_name}, and the name as L{_name_text} would give it, without
    the cost of formatting it again.
    """
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise DomainError(f"{name!r} is not an ASCII name") from None
    if not isinstance(name, str):
        raise DomainError(f"name must be text, not {type(name).__name__}")
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DomainError(f"empty name {name!r}")
    labels = []
    for label in text.split("."):
        if label.isascii():
            labels.append(label.lower())
            continue
        try:
            labels.append(idna.encode(label, uts46=True, transitional=False).decode("ascii").lower())
        except (idna.IDNAError, UnicodeError) as e:
            raise DomainError(f"{name!r} is not a valid internationalised name: {e}") from None
    text = ".".join(labels)
    plain = _PLAIN_NAME.issuperset(text)
    try:
        if plain:
            # Nothing to unescape: the labels as they are; Name checks
            # their lengths and empty labels as from_text would (a third
            # of from_text's cost on the cold-lookup path).
            qname = dns.name.Name([label.encode("ascii") for label in labels] + [b""])
        else:
            qname = dns.name.from_text(text + ".")
    except dns.exception.DNSException as e:
        raise DomainError(f"{name!r} is not a valid DNS name: {e}") from None
    if not plain:
        text = _name_text(qname)  # escapes, as dnspython writes them
    return qname, text


def _name_text(name: dns.name.Name) -> str:
    """A name as lower-case text without the trailing dot."""
    return name.to_text(omit_final_dot=True).lower()


@functools.cache
def _type_text(rdtype: int) -> str:
    """C{dns.rdatatype.to_text}, once per type (an enum lookup otherwise)."""
    # dnspython types the argument as its enum; any int is accepted.
    return dns.rdatatype.to_text(rdtype)  # type: ignore[arg-type]
