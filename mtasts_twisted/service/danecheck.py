"""
The start-up checks of C{--dane}: DANE is only as good as the validating
resolver behind it (RFC 7672 §2.1.1: "a trusted validating resolver",
reached over a secure channel: in practice one on the same host).

  - L{remote_nameservers}: the configured nameservers not on loopback
    (their AD bits cross the network unauthenticated).
  - L{probe_ad}: ask once for a name known to be signed, with the DO bit,
    and say whether the answer (or its denial) came back with AD.
  - L{check_dane_resolver}: both, as warning lines in the log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from twisted.logger import Logger

from mtasts_twisted.dns import DNSError, DNSNoRecordError, parse_nameserver
from mtasts_twisted.interfaces import IDNSResolver

__all__ = ["DEFAULT_PROBE_NAME", "check_dane_resolver", "probe_ad", "remote_nameservers"]

log = Logger()

#: A name in a DNSSEC-signed zone (a TLD signed since 2010): its TXT
#: answer or denial is secure behind any validating resolver.
DEFAULT_PROBE_NAME = "org"


def remote_nameservers(nameservers: Sequence[str]) -> list[str]:
    """
    The nameservers (C{IP[:PORT]}) whose address is not a loopback one.
    """
    remote = []
    for server in nameservers:
        host, _ = parse_nameserver(server)
        try:
            loopback = ipaddress.ip_address(host.partition("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            remote.append(server)
    return remote


async def probe_ad(resolver: IDNSResolver, name: str = DEFAULT_PROBE_NAME) -> bool | None:
    """
    Whether the resolver validates: a TXT query for C{name} (with DO, as
    every query) answered or denied with the AD bit.

    @return: C{True} (AD set), C{False} (no AD), or L{None} when the
        lookup failed (nothing learned).
    """
    try:
        answer = await resolver.lookup_txt(name)
    except DNSNoRecordError as e:
        return bool(e.secure)
    except DNSError:
        return None
    return bool(answer.secure)


async def check_dane_resolver(
    resolver: IDNSResolver, nameservers: Sequence[str], probe_name: str = DEFAULT_PROBE_NAME
) -> list[str]:
    """
    Log (and return) one warning line per problem of the resolver DANE
    relies on: nameservers off loopback, no AD on a signed name, or a
    probe that failed.
    """
    warnings = []
    remote = remote_nameservers(nameservers)
    if remote:
        warnings.append(
            f"DANE: nameserver {', '.join(remote)} is not on loopback: its AD bits cross the network "
            "unauthenticated (RFC 7672 §2.1.1: use a validating resolver on this host)")
    if not nameservers:
        warnings.append("DANE: no --nameserver given: the system's nameservers must validate DNSSEC")
    ad = await probe_ad(resolver, probe_name)
    if ad is False:
        warnings.append(
            f"DANE: the nameservers did not set AD for {probe_name} (DNSSEC-signed): they do not validate, "
            "so no TLSA record will ever be secure and DANE never applies")
    elif ad is None:
        warnings.append(f"DANE: could not ask the nameservers about {probe_name}: DNSSEC validation unchecked")
    for line in warnings:
        log.warn("{text}", text=line)  # noqa: G010
    return warnings
