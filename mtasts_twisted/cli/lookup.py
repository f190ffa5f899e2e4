"""
C{mtasts-twisted lookup DOMAIN}: a domain's MTA-STS policy through the
service's policy cache when there is one (or a fresh discovery), its TLSRPT
record, and what a sender would do.

A lookup never creates a cache: without C{DIR/mtasts.sqlite} it discovers
afresh, as with C{--no-cache}, and leaves nothing behind.

With C{--policy-overrides FILE} the lookup asks the same policy source as
the service (L{mtasts_twisted.overrides}), and says when an override
decides the domain: an C{override:} line, and the JSON C{override} field
(null, or C{kind}, C{mx}, C{until}, C{reason}, C{source}); C{policy} stays
what the domain publishes.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, TextIO

from zope.interface import implementer

from mtasts_twisted.cli.common import EX_CANTCREAT, EX_OK, EX_TEMPFAIL, EX_USAGE, iso, sqlite_path
from mtasts_twisted.interfaces import IPolicyFetcher
from mtasts_twisted.policy import MTASTSError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime
    from twisted.python.failure import Failure

    from mtasts_twisted.cli.common import Reactor
    from mtasts_twisted.fetch import FetchedPolicy
    from mtasts_twisted.cache import Lookup, PolicyCache
    from mtasts_twisted.interfaces import IDNSResolver, IStore
    from mtasts_twisted.overrides import OverrideTable
    from mtasts_twisted.policy import Policy

__all__ = ["run_lookup"]


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


def _load_overrides(args: argparse.Namespace) -> OverrideTable | None:
    """The C{--policy-overrides} file, or L{None}; raises L{OverrideFileError}."""
    path = getattr(args, "policy_overrides", None)
    if not path:
        return None
    from mtasts_twisted.overrides import OverrideTable, load_overrides

    return OverrideTable(path, load_overrides(path))


def _overridden(cache: PolicyCache, table: OverrideTable | None, clock: IReactorTime, alabel: str) -> Deferred[Lookup]:
    """The lookup through the overrides, as the socketmap makes it (C{dane-only} answered, not deferred)."""
    if table is None:
        return cache.get(alabel)
    from mtasts_twisted.overrides import OverridingPolicySource

    return OverridingPolicySource(cache, table, clock).get(alabel)


def _published(lookup: Lookup) -> Policy | None:
    """The policy the domain's own lookup found (before any override)."""
    from mtasts_twisted.overrides import OverriddenLookup

    return lookup.published if isinstance(lookup, OverriddenLookup) else lookup.policy


def _override_json(lookup: Lookup) -> dict[str, Any] | None:
    """The JSON C{override} field: the override that decided, or L{None}."""
    override = getattr(lookup, "override", None)
    return None if override is None else override.to_json()


def _override_lines(lookup: Lookup) -> list[str]:
    """The human lines saying an override decides the domain (none without one)."""
    from mtasts_twisted.overrides import override_text

    override = getattr(lookup, "override", None)
    return [] if override is None else [f"  override: {override_text(override)}\n"]


def _action(lookup: Lookup) -> str:
    """What a sender would do, with the override (if any) applied."""
    from mtasts_twisted.overrides import sender_action

    return sender_action(lookup)


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
    from mtasts_twisted.overrides import OverrideFileError

    try:
        table = _load_overrides(args)
    except OverrideFileError as e:
        return usage(f"--policy-overrides {e}")
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
            lookup = await _overridden(cache, table, reactor, alabel)
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
    policy, entry = _published(lookup), lookup.entry
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
            "action": _action(lookup),
            "reason": reason,
            "override": _override_json(lookup),
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
    for line in _override_lines(lookup):
        out.write(line)
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
    out.write(f"  a sender would {_action(lookup)}\n")
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
