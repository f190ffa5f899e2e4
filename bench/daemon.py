"""
A minimal socketmap daemon built from the package's objects, as
C{twistd -n mtasts --socketmap ...} builds them (resolver, fetcher, SQLite
store, PolicyCache, SocketmapFactory), with package defaults everywhere.

    python bench/daemon.py --port 18461 --data-dir D --nameserver 127.0.0.1:53 \
        --ca-file ca.pem [--profile out.prof]

Prints READY when listening.  SIGTERM stops it (flushing the cache);
with --profile, SIGUSR1 starts cProfile and SIGUSR2 stops it and writes the
statistics.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from twisted.internet import defer, reactor


async def start(args):
    from mtasts_twisted.cache import PolicyCache
    from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
    from mtasts_twisted.fetch import PolicyFetcher
    from mtasts_twisted.socketmap import SocketmapFactory
    from mtasts_twisted.store import default_database_url, open_store

    from mtasts_twisted.cache import CacheSettings

    # As service.open_runtime builds them (same resolver cache size, the
    # fetcher pre-resolving the policy host through the same resolver).
    resolver = DNSResolver(reactor, args.nameserver, cache_size=CacheSettings().front_size // 2)
    fetcher = PolicyFetcher(reactor, trust_roots=args.ca_file, resolver=resolver,
                            name_resolver=DNSHostnameResolver(resolver))
    os.makedirs(args.data_dir, exist_ok=True)
    store = await open_store(default_database_url(args.data_dir), reactor)
    cache = PolicyCache(store, resolver, fetcher, reactor)
    cache.start()
    factory = SocketmapFactory(cache, resolver, reactor)
    reactor.listenTCP(args.port, factory, backlog=1024, interface="127.0.0.1")
    return cache, store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--nameserver", action="append", required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--profile", help="write cProfile statistics here on exit")
    args = parser.parse_args()

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    state = {}

    def started(result):
        state["cache"], state["store"] = result
        print("READY", flush=True)

    def failed(failure):
        print("FAILED", failure.getTraceback(), file=sys.stderr, flush=True)
        reactor.stop()

    async def shutdown():
        if "cache" in state:
            await state["cache"].stop()
            await state["store"].close()

    def on_term(signum, frame):
        reactor.callFromThread(lambda: defer.Deferred.fromCoroutine(shutdown()).addBoth(lambda _: reactor.stop()))

    signal.signal(signal.SIGTERM, on_term)
    if profiler is not None:
        # SIGUSR1 starts profiling, SIGUSR2 stops it and writes the statistics.
        def on_usr1(signum, frame):
            reactor.callFromThread(profiler.enable)

        def on_usr2(signum, frame):
            def dump():
                profiler.disable()
                profiler.dump_stats(args.profile)
                print("PROFILED", flush=True)

            reactor.callFromThread(dump)

        signal.signal(signal.SIGUSR1, on_usr1)
        signal.signal(signal.SIGUSR2, on_usr2)
    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(start(args)).addCallbacks(started, failed))
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()
