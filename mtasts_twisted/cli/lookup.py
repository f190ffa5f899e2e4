"""
C{mtasts-twisted lookup DOMAIN}: a domain's MTA-STS policy through the
service's policy cache when there is one (or a fresh discovery), its TLSRPT
record, and what a sender would do.

A lookup never creates a cache: without C{DIR/mtasts.sqlite} it discovers
afresh, as with C{--no-cache}, and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, TextIO

from zope.interface import implementer

from mtasts_twisted.cli.common import EX_CANTCREAT, EX_OK, EX_TEMPFAIL, EX_USAGE, iso, sqlite_path
from mtasts_twisted.interfaces import IPolicyFetcher
from mtasts_twisted.policy import MTASTSError, Mode

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from mtasts_twisted.cli.common import Reactor
    from mtasts_twisted.fetch import FetchedPolicy
    from mtasts_twisted.interfaces import IDNSResolver, IStore

__all__ = ["run_lookup"]


_ACTIONS = {
    Mode.ENFORCE: "deliver only over STARTTLS with a verified certificate, to MX hosts the policy names",
    Mode.TESTING: "deliver as usual, and report what would have failed under enforce",
    Mode.NONE: "deliver as usual (opportunistic TLS); the domain asks for no enforcement",
    None: "deliver as usual (opportunistic TLS): no MTA-STS policy applies",
}


@implementer(IPolicyFetcher)
class _ReasonFetcher:
    """
    A policy fetcher that keeps the whole text of the last failure, for the
    operator: a report's failure details carry only a reason code.
    """

    def __init__(self, fetcher: IPolicyFetcher) -> None:
        self._fetcher = fetcher
        self.reason: str | None = None

    def fetch(self, domain: str) -> Deferred[FetchedPolicy]:
        """Fetch through the wrapped fetcher, keeping a failure's text."""

        def failed(failure: Failure) -> Failure:
            self.reason = str(failure.value)
            return failure

        return self._fetcher.fetch(domain).addErrback(failed)


def _reason(lookup_failures: Any, fetch_reason: str | None) -> str | None:
    """The human text of what went wrong in a lookup, whole, or L{None}."""
    if not lookup_failures:
        return None
    if fetch_reason is not None:
        return fetch_reason
    texts = [f.additional_information for f in lookup_failures if f.additional_information]
    return "; ".join(texts) or None


async def _tlsrpt_record(resolver: IDNSResolver, alabel: str) -> tuple[dict[str, list[str]] | None, str | None]:
    """The domain's TLSRPT record as JSON, or the reason there is none."""
    from mtasts_twisted.dns import DNSError, DNSNoRecordError
    from mtasts_twisted.dns.records import lookup_tlsrpt_record
    from mtasts_twisted.policy import NoRecordError

    try:
        record = await lookup_tlsrpt_record(resolver, alabel)
    except (DNSNoRecordError, NoRecordError):
        # No TXT at all, or TXT but no TLSRPT record among it: no record.
        return None, None
    except (DNSError, MTASTSError) as e:
        return None, str(e)
    return {"rua": list(record.rua)}, None


async def run_lookup(reactor: Reactor, args: argparse.Namespace, out: TextIO, err: TextIO, policy_port: int = 443) -> int:
    """
    C{mtasts-twisted lookup}: the policy of a domain through the policy
    cache in C{--data-dir} when it exists (or a fresh discovery, without a
    cache or with C{--no-cache}; a lookup never creates a cache).

    @param policy_port: the HTTPS port of policy hosts (tests use others).
    @return: the exit code: 0 for a definite answer, 75 on a temporary
        failure, 64 on bad usage, 73 when the cache cannot be opened.
    """
    from mtasts_twisted.cache import PolicyCache, PolicyLookupTemporaryError
    from mtasts_twisted.dns import DNSResolver
    from mtasts_twisted.fetch import PolicyFetcher
    from mtasts_twisted.policy import DomainError, is_address_literal, to_alabel
    from mtasts_twisted.store import MemoryStore, StoreError, default_database_url, open_store

    def usage(message: str) -> int:
        err.write(f"mtasts-twisted lookup: {message}\n")
        return EX_USAGE

    if is_address_literal(args.domain):
        out.write(json.dumps({"domain": args.domain, "policy": None, "fresh": True, "tlsrpt_record": None,
                              "result": None, "note": "address literals have no MTA-STS policy"}) + "\n"
                  if args.json else f"{args.domain}: an address literal has no MTA-STS policy\n")
        return EX_OK
    try:
        alabel = to_alabel(args.domain)
    except DomainError as e:
        return usage(str(e))
    try:
        resolver = DNSResolver(reactor, args.nameserver or None, timeout=args.timeout / 3, budget=args.timeout)
    except (ValueError, OSError) as e:
        return usage(f"--nameserver: {e}")
    if args.ca_file and not os.path.isfile(args.ca_file):
        return usage(f"--ca-file {args.ca_file}: no such file")
    try:
        fetcher = _ReasonFetcher(PolicyFetcher(
            reactor, trust_roots=args.ca_file, timeout=min(60.0, args.timeout * 6), resolver=resolver,
            port=policy_port))
    except (ValueError, OSError, MTASTSError) as e:
        return usage(f"--ca-file {args.ca_file}: {e}")
    url = default_database_url(args.data_dir)
    path = sqlite_path(url)
    if args.no_cache or path is None or not os.path.exists(path):
        store: IStore = MemoryStore()  # never create a cache for a lookup
    else:
        try:
            store = await open_store(url, reactor)
        except (OSError, StoreError) as e:
            err.write(f"mtasts-twisted lookup: cannot open the policy cache: {e}\n")
            return EX_CANTCREAT
    cache = PolicyCache(store, resolver, fetcher, reactor)
    try:
        fetches = cache.stats["fetches"]
        try:
            lookup = await cache.get(alabel)
        except PolicyLookupTemporaryError as e:
            if args.json:
                out.write(json.dumps({"domain": alabel, "policy": None, "fresh": False, "tlsrpt_record": None,
                                      "result": e.result.to_json(), "error": str(e)}) + "\n")
            else:
                err.write(f"{alabel}: temporary failure, try again later: {e}\n")
            return EX_TEMPFAIL
        tlsrpt, tlsrpt_error = await _tlsrpt_record(resolver, alabel)
        dane = await _dane(resolver, alabel, lookup.policy, args)
        await cache.flush()
    finally:
        await cache.stop()
        await store.close()
    fetched = cache.stats["fetches"] > fetches
    policy, entry = lookup.policy, lookup.entry
    reason = _reason(lookup.result.failures, fetcher.reason)
    source = "none" if policy is None else ("fetched" if fetched else "cache")
    if args.json:
        obj: dict[str, Any] = {
            "domain": alabel,
            "policy": None if policy is None else {
                "mode": policy.mode.value, "mx": list(policy.mx), "max_age": policy.max_age,
                "id": lookup.record_id, "text": policy.text,
            },
            "fresh": lookup.fresh,
            "source": source,
            "valid_until": iso(entry.valid_end) if policy is not None and entry else None,
            "tlsrpt_record": tlsrpt,
            "result": lookup.result.to_json(),
            "action": _ACTIONS[policy.mode if policy else None],
            "reason": reason,
        }
        if tlsrpt_error:
            obj["tlsrpt_error"] = tlsrpt_error
        if dane is not None:
            obj["dane"] = dane
        out.write(json.dumps(obj) + "\n")
        return _dane_exit(dane)
    if policy is None:
        out.write(f"{alabel}: no MTA-STS policy\n")
    else:
        out.write(f"{alabel}: MTA-STS policy, mode {policy.mode.value} (id {lookup.record_id})\n")
        for pattern in policy.mx:
            out.write(f"  mx {pattern}\n")
        state = "confirmed now" if lookup.fresh else "NOT confirmed now, cached copy in use"
        origin = "fetched now" if fetched else "from the cache"
        until = iso(entry.valid_end) if entry else "?"
        out.write(f"  max_age {policy.max_age} s; {origin}, {state}; valid until {until}\n")
    for failure in lookup.result.failures:
        out.write(f"  problem: {failure.result_type.value} ({failure.failure_reason_code})"
                  f"{': ' + reason if reason else ''}\n")
    if tlsrpt:
        out.write(f"  TLSRPT reports to: {', '.join(tlsrpt['rua'])}\n")
    elif tlsrpt_error:
        out.write(f"  TLSRPT record unusable: {tlsrpt_error}\n")
    else:
        out.write("  no TLSRPT record\n")
    if dane is not None:
        from mtasts_twisted.cli.dane import write_dane

        write_dane(out, dane)
        out.write("  (with DANE: a host decided by dane is not subject to the MTA-STS policy, RFC 8461 §2)\n")
    out.write(f"  a sender would {_ACTIONS[policy.mode if policy else None]}\n")
    return _dane_exit(dane)


async def _dane(resolver: IDNSResolver, alabel: str, policy: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """C{--dane}: the DANE status per MX host (L{mtasts_twisted.cli.dane}), or L{None} without it."""
    if not getattr(args, "dane", False):
        return None
    from mtasts_twisted.cli.dane import lookup_dane

    return await lookup_dane(resolver, alabel, policy)


def _dane_exit(dane: dict[str, Any] | None) -> int:
    """75 when C{--dane}'s MX lookup failed temporarily, else 0."""
    return EX_TEMPFAIL if dane is not None and dane["temporary"] else EX_OK
