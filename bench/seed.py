"""
Pre-seed our SQLite policy cache with COUNT valid enforce policies for
rN.rss.bench.test through the store API (Shelf.put of CacheEntry.to_json()),
so the RSS test does not need 100,000 HTTPS fetches.

    python bench/seed.py --data-dir D --count 100000
"""

from __future__ import annotations

import argparse
import os
import time

from twisted.internet import defer, task


async def seed(reactor, args) -> None:
    from mtasts_twisted.cache import POLICY_TABLE, CacheEntry
    from mtasts_twisted.policy import parse_policy
    from mtasts_twisted.store import default_database_url, open_store

    os.makedirs(args.data_dir, exist_ok=True)
    store = await open_store(default_database_url(args.data_dir), reactor)
    shelf = store.shelf(POLICY_TABLE)
    now = time.time()
    batch = []
    for i in range(args.count):
        domain = f"r{i}.rss.bench.test"
        policy = parse_policy(f"version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: 86400\n")
        entry = CacheEntry(domain=domain, alabel=domain, inserted=now, last_update=now, last_use=now,
                           record_id="1", policy=policy, valid_end=now + 86400)
        batch.append(shelf.put(domain, entry.to_json()))
        if len(batch) >= 2000:
            await defer.gatherResults(batch, consumeErrors=True)
            batch = []
    await defer.gatherResults(batch, consumeErrors=True)
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--count", type=int, default=100000)
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(seed(reactor, args)))


if __name__ == "__main__":
    main()
