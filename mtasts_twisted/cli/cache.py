"""
C{mtasts-twisted cache list|show DOMAIN|purge DOMAIN}: the policy cache
in the service's database.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, TextIO

from mtasts_twisted.cli.common import EX_CANTCREAT, EX_NOINPUT, EX_OK, EX_USAGE, database_url, iso, missing_database

if TYPE_CHECKING:
    from mtasts_twisted.cache import CacheEntry
    from mtasts_twisted.cli.common import Reactor

__all__ = ["run_cache"]


def _entry_json(entry: CacheEntry) -> dict[str, Any]:
    row = entry.to_json()
    row["valid_until"] = iso(entry.valid_end) if entry.policy is not None else None
    return row


async def run_cache(reactor: Reactor, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted cache list|show DOMAIN|purge DOMAIN} on the policy
    cache in C{--data-dir} (or C{--database}).

    A running service keeps a purged policy in its memory until the TXT
    record's TTL ends; the next lookup after that finds no cache entry and
    fetches the policy again.
    """
    from mtasts_twisted.cache import PolicyCache
    from mtasts_twisted.policy import DomainError, to_alabel, to_unicode
    from mtasts_twisted.store import StoreError, open_store

    url = database_url(args)
    if missing_database(url, "cache", err):
        return EX_NOINPUT
    key = None
    if args.action != "list":
        try:
            key = to_unicode(to_alabel(args.domain))
        except DomainError as e:
            err.write(f"mtasts-twisted cache {args.action}: {e}\n")
            return EX_USAGE
    try:
        store = await open_store(url, reactor)
    except StoreError as e:
        err.write(f"mtasts-twisted cache: cannot open the policy cache: {e}\n")
        return EX_CANTCREAT
    cache = PolicyCache(store, None, None, reactor)
    try:
        if args.action == "list":
            entries = await cache.entries()
            if args.json:
                out.write(json.dumps([_entry_json(e) for e in entries]) + "\n")
            elif not entries:
                out.write("the cache is empty\n")
            for entry in entries if not args.json else ():
                if entry.policy is not None:
                    out.write(f"{entry.domain}\t{entry.policy.mode.value}\tid {entry.record_id}"
                              f"\tvalid until {iso(entry.valid_end)}\tlast used {iso(entry.last_use)}\n")
                else:
                    out.write(f"{entry.domain}\tbackoff until {iso(entry.backoff_until)}\n")
            return EX_OK
        assert key is not None
        if args.action == "show":
            found = await cache.entry(key)
            if found is None:
                err.write(f"{key}: not in the cache\n")
                return EX_NOINPUT
            out.write(json.dumps(_entry_json(found), indent=None if args.json else 2) + "\n")
            return EX_OK
        if await cache.delete(key):
            out.write(f"{key}: purged\n")
            return EX_OK
        err.write(f"{key}: not in the cache\n")
        return EX_NOINPUT
    finally:
        await store.close()
