"""
The TLSA search for one MX host (RFC 7672 §2.2.1–§2.2.3) over any
L{IDNSResolver}: whether the MX RRset was secure, the host's address
records and their CNAME chain, then the TLSA records of each candidate
TLSA base domain in turn, giving a L{DANEStatus}.

Every lookup error (SERVFAIL, which is how a validating resolver reports a
"bogus" or "indeterminate" answer; timeouts; malformed replies) ends the
search with L{DANEState.BOGUS}: never "no DANE" (RFC 7672 §2.1.1–§2.1.2).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mtasts_twisted.dane.records import select_records
from mtasts_twisted.dane.status import DANEState, DANEStatus, tlsa_name
from mtasts_twisted.dns import AddressAnswer, DNSNoRecordError, DNSTemporaryError, TLSAAnswer
from mtasts_twisted.interfaces import IDNSResolver

__all__ = ["discover_dane", "search_tlsa"]

log = Logger()


def discover_dane(
    resolver: IDNSResolver,
    host: str,
    *,
    mx_secure: bool,
    port: int = 25,
    addresses: AddressAnswer | None = None,
) -> Deferred[DANEStatus]:
    """
    What DANE says of MX host C{host}.

    @param resolver: an L{IDNSResolver} backed by a trusted validating
        resolver (its C{secure} flags are the AD bits, RFC 7672 §2.1.1).
    @param host: the MX host name (A-labels), or the next hop itself when
        there is no MX (an implicit MX, or a configured relay).
    @param mx_secure: whether the MX RRset naming C{host} was secure (or
        C{host} is a configured next hop, not subject to MX resolution).
        DANE is not used with hosts of an insecure MX RRset (RFC 7672
        §2.2.1 allows it, Postfix and we do not): an attacker who can
        forge the MX RRset can name hosts of his own.
    @param port: the SMTP port delivery will connect to (the TLSA name's
        C{_PORT} label, RFC 7672 §2.2.3).
    @param addresses: the host's address answer when the caller has it
        already; looked up otherwise (RFC 7672 §2.2.2: addresses before
        TLSA records).
    @return: L{Deferred} firing with a L{DANEStatus}; it fails with
        L{DNSNoRecordError} only when the host has no addresses at all
        (it is unreachable, DANE or not).
    """
    return Deferred.fromCoroutine(_discover(resolver, host, mx_secure, port, addresses))


async def _discover(
    resolver: IDNSResolver, host: str, mx_secure: bool, port: int, addresses: AddressAnswer | None
) -> DANEStatus:
    host = host.lower().rstrip(".")
    if _is_literal(host):
        # RFC 7672 §2.2: DANE does not apply to an address in lieu of a host.
        return DANEStatus(host, DANEState.INSECURE, port, detail="an address literal, not a host name")
    if not mx_secure:
        # RFC 7672 §2.2.1: an insecure MX RRset.
        return DANEStatus(host, DANEState.INSECURE, port, detail="the MX RRset is not DNSSEC-secure")
    if addresses is None:
        try:
            addresses = await resolver.lookup_addresses(host)
        except DNSTemporaryError as e:
            return _failed(host, port, f"address lookup failed: {e}")
    candidates = await _candidates(resolver, host, port, addresses)
    if isinstance(candidates, DANEStatus):
        return candidates
    return await search_tlsa(resolver, host, candidates, port, ttl=addresses.ttl)


async def _candidates(
    resolver: IDNSResolver, host: str, port: int, addresses: AddressAnswer
) -> tuple[str, ...] | DANEStatus:
    """
    The candidate TLSA base domains of RFC 7672 §2.2.2 and §2.2.3, or the
    status that ends the search.
    """
    canonical = addresses.canonical.lower().rstrip(".")
    if addresses.secure:
        # Secure (CNAME chain and addresses): the expanded name first, then
        # the name itself ("Secure CNAME"; or just the name: "Non-CNAME").
        return (canonical, host) if canonical != host else (host,)
    if canonical == host:
        # RFC 7672 §2.2.2: insecure address records, no alias: no TLSA
        # lookups (they would time out at broken unsigned zones' servers).
        return DANEStatus(host, DANEState.INSECURE, port, ttl=addresses.ttl,
                          detail="the address records are not DNSSEC-secure")
    # "Insecure CNAME": the chain ends insecure; the host's own name is a
    # candidate if its CNAME (the first link) is secure, RFC 7672 §2.1.3.
    try:
        alias = await resolver.lookup_cname(host)
    except DNSTemporaryError as e:
        return _failed(host, port, f"CNAME lookup failed: {e}")
    except DNSNoRecordError:
        # The address lookup went through an alias the CNAME lookup denies:
        # answers that disagree are no basis for a decision.
        return _failed(host, port, f"{host} led to {canonical} but has no CNAME record")
    if not alias.secure:
        return DANEStatus(host, DANEState.INSECURE, port, ttl=min(addresses.ttl, alias.ttl),
                          detail=f"the CNAME of {host} is not DNSSEC-secure")
    return (host,)


async def search_tlsa(
    resolver: IDNSResolver, host: str, candidates: tuple[str, ...], port: int = 25, ttl: int = 86400
) -> DANEStatus:
    """
    Look up the TLSA records of each candidate base domain in turn (RFC
    7672 §2.2.3): the first with a secure TLSA RRset is the TLSA base
    domain; an insecure RRset or a denial moves on to the next; any lookup
    failure ends the search as L{DANEState.BOGUS} (§2.1.2).

    @param host: the MX host name (A-labels).
    @param candidates: the candidate base domains, preferred first.
    @param port: the SMTP port.
    @param ttl: the TTL of the answers that led here (the status's TTL is
        the smallest of it and those of the TLSA answers).
    """
    denials_secure = True
    for candidate in candidates:
        name = tlsa_name(candidate, port)
        try:
            answer: TLSAAnswer = await resolver.lookup_tlsa(name)
        except DNSTemporaryError as e:
            return _failed(host, port, f"TLSA lookup of {name} failed: {e}")
        except DNSNoRecordError as e:
            denials_secure = denials_secure and e.secure
            continue
        ttl = min(ttl, answer.ttl)
        if not answer.secure:
            denials_secure = False
            continue
        usable = select_records(answer.records)
        state = DANEState.USABLE if usable else DANEState.UNUSABLE
        detail = "" if usable else "no usable TLSA record: TLS required, without authentication"
        return DANEStatus(host, state, port, candidate, name, answer.records, usable, ttl, detail)
    if denials_secure:
        return DANEStatus(host, DANEState.NONE, port, ttl=ttl, detail="no TLSA records (secure denial)")
    return DANEStatus(host, DANEState.INSECURE, port, ttl=ttl, detail="no secure TLSA records")


def _failed(host: str, port: int, detail: str) -> DANEStatus:
    log.info("DANE lookup for MX host {host} failed: {detail}", host=host, detail=detail)
    return DANEStatus(host, DANEState.BOGUS, port, detail=detail)


def _is_literal(host: str) -> bool:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
