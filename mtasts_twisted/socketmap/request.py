"""
What Postfix asks: a socketmap request payload split into C{(name, key)}
(socketmap_table(5)), and the key, a C{smtp_tls_policy_maps} next-hop
destination, normalised to the policy domain it names (if any).
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from mtasts_twisted.policy import DomainError, MTASTSError, to_alabel

__all__ = ["MalformedRequestError", "ParsedKey", "parse_key", "parse_request"]


class MalformedRequestError(MTASTSError):
    """A request is not C{NAME KEY}, or its key is not a next-hop name."""

    reason = "malformed-request"


@attrs.frozen
class ParsedKey:
    """
    A normalised C{smtp_tls_policy_maps} lookup key.

    @ivar domain: the policy domain in A-labels (lower case, no trailing dot),
        or L{None} when no MTA-STS policy can apply: an address literal or a
        parent-domain key (C{.example.com}, sent when
        C{parent_domain_matches_subdomains} covers the map).
    @ivar bracketed: the key was C{[name]} or C{[name]:port}: Postfix connects
        to that host itself, without an MX lookup.
    @ivar port: the port of a C{name:port} key, if any.
    """

    domain: str | None
    bracketed: bool = False
    port: int | None = None


_BAD_KEY_CHARS = re.compile(r"[\x00-\x20\x7f]")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _port(text: str, key: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise MalformedRequestError(f"bad port in key {key[:80]!r}")
    return int(text)


def parse_key(key: str) -> ParsedKey:
    """
    Normalise a Postfix TLS policy lookup key (the next-hop destination).

    Accepted: C{domain}, C{[domain]}, C{domain:port}, C{[domain]:port}, in
    any case, with or without a trailing dot, in U-labels (converted to
    A-labels with UTS 46 / IDNA 2008).  Address literals (C{[192.0.2.1]},
    C{[IPv6:2001:db8::1]}, bare IPs, with or without port) and parent-domain
    keys (C{.example.com}) parse with C{domain=None}: no policy applies.

    @raise MalformedRequestError: an empty key, one with spaces or control
        characters, unbalanced brackets, a bad port or an invalid domain.
    """
    if not key:
        raise MalformedRequestError("empty key")
    if _BAD_KEY_CHARS.search(key):
        raise MalformedRequestError(f"space or control character in key {key[:80]!r}")
    port = None
    bracketed = key[0] == "["
    if bracketed:
        close = key.find("]")
        if close < 0:
            raise MalformedRequestError(f"unbalanced bracket in key {key[:80]!r}")
        host = key[1:close]
        rest = key[close + 1:]
        if rest:
            if rest[0] != ":":
                raise MalformedRequestError(f"text after ']' in key {key[:80]!r}")
            port = _port(rest[1:], key)
        if host[:5].lower() == "ipv6:" or _is_ip(host):
            return ParsedKey(None, True, port)  # address literal: no policy domain
    else:
        if _is_ip(key):
            return ParsedKey(None)  # a bare IPv4 or IPv6 address
        host, colon, port_text = key.rpartition(":")
        if colon:
            port = _port(port_text, key)
        else:
            host = key
        if _is_ip(host.rstrip(".")):
            return ParsedKey(None, False, port)
    if host.startswith("."):
        return ParsedKey(None, bracketed, port)  # a Postfix parent-domain lookup
    if not host:
        raise MalformedRequestError(f"no host name in key {key[:80]!r}")
    if "[" in host or "]" in host or ":" in host:
        raise MalformedRequestError(f"malformed key {key[:80]!r}")
    try:
        return ParsedKey(to_alabel(host), bracketed, port)
    except DomainError as e:
        raise MalformedRequestError(str(e)) from None


def parse_request(data: bytes) -> tuple[str, str]:
    """
    Split a socketmap request payload into C{(name, key)} (socketmap_table(5):
    C{name <space> key}).

    @raise MalformedRequestError: no space, an empty name or key, or bytes
        that are not UTF-8.
    """
    name, space, key = data.partition(b" ")
    if not space:
        raise MalformedRequestError("request is not 'name key'")
    if not name:
        raise MalformedRequestError("empty map name")
    if not key:
        raise MalformedRequestError("empty key")
    try:
        return name.decode("utf-8"), key.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequestError("request is not UTF-8") from None
