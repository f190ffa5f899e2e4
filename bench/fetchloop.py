"""
CPU per cold policy lookup on our side only, without a socketmap: a fixed
set of never-seen domains through C{PolicyCache.get} (TXT lookup, policy
host lookup, HTTPS fetch, parse, store) with 32 in flight, timed with the
process's own CPU clock.  For A/B comparisons of the cold path while the
machine is not idle: CPU time is steadier than lookups/s.

As root (it makes a network namespace with only C{lo})::

    python bench/fetchloop.py [--count 1500] [--database memory:|sqlite] [--profile out.prof]

The bench world (DNS + HTTPS, bench/world.py) runs in its own process;
its CPU per lookup is printed too.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _reexec_in_netns() -> None:
    if os.environ.get("MTASTS_FETCHLOOP_NETNS") == "1":
        return
    os.execvpe("unshare", ["unshare", "--net", sys.executable, *sys.argv],
               dict(os.environ, MTASTS_FETCHLOOP_NETNS="1"))


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1500, help="cold domains (at most 3000)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--database", default="memory:", help="memory: (default) or sqlite")
    parser.add_argument("--profile", help="write cProfile statistics of the loop here")
    args = parser.parse_args()
    _reexec_in_netns()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    workdir = tempfile.mkdtemp(prefix="mtasts-fetchloop-")
    world = subprocess.Popen([sys.executable, os.path.join(HERE, "world.py"), "--workdir", workdir,
                              "--cached", "1", "--cold", "3000", "--control", "9999"],
                             stdout=subprocess.PIPE, stderr=open(os.path.join(workdir, "world.log"), "ab"))
    try:
        if b"READY" not in world.stdout.readline():
            raise SystemExit(f"world did not start; see {workdir}/world.log")
        _run(args, workdir, world.pid)
    finally:
        world.terminate()
        world.wait()


def _run(args, workdir: str, world_pid: int) -> None:
    from twisted.internet import defer, reactor

    from mtasts_twisted.cache import CacheSettings, PolicyCache
    from mtasts_twisted.dns import DNSResolver
    from mtasts_twisted.fetch import PolicyFetcher
    from mtasts_twisted.store import default_database_url, open_store

    async def loop() -> dict:
        resolver = DNSResolver(reactor, ["127.0.0.1:53"], cache_size=CacheSettings().front_size // 2)
        fetcher = PolicyFetcher(reactor, trust_roots=os.path.join(workdir, "ca.pem"), resolver=resolver)
        url = "memory:" if args.database == "memory:" else default_database_url(workdir)
        store = await open_store(url, reactor)
        cache = PolicyCache(store, resolver, fetcher, reactor)
        cache.start()
        # One warm-up lookup: imports, the first SQLite connection.
        await cache.get("c2999.bench.test")
        names = iter(f"c{i}.bench.test" for i in range(args.count))
        failures: list[str] = []

        async def worker() -> None:
            for name in names:
                try:
                    entry = await cache.get(name)
                    if entry is None:
                        failures.append(name)
                except Exception as e:
                    failures.append(f"{name}: {e}")

        profiler = None
        if args.profile:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        world_before = _cpu_ticks(world_pid)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)])
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        world_cpu = (_cpu_ticks(world_pid) - world_before) / os.sysconf("SC_CLK_TCK")
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        await cache.stop()
        await store.close()
        return {"lookups": args.count, "failures": failures[:5], "failed": len(failures),
                "cpu_ms_per_lookup": round(cpu * 1000 / args.count, 3),
                "world_cpu_ms_per_lookup": round(world_cpu * 1000 / args.count, 3),
                "lookups_per_s": round(args.count / wall, 1),
                "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    result: dict = {}

    def done(value):
        result.update(value)
        reactor.stop()

    def failed(failure):
        print(failure.getTraceback(), file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(loop()).addCallbacks(done, failed))
    reactor.run()
    print(result)


if __name__ == "__main__":
    main()
