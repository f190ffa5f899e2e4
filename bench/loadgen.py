"""
Socketmap load generator: its own process, one thread, epoll, non-blocking
sockets, one request in flight per connection (like Postfix's smtp(8)).

    python bench/loadgen.py --port 18461 --conns 8 --duration 10 \
        --keys 'd{i}.bench.test' --nkeys 1000 [--once] [--rate R] [--burst] \
        [--max N] [--pid DAEMON_PID]

Keys are taken in order from the pattern (``{i}`` from 0 to nkeys-1),
cycling unless --once.  Every run is bounded by --duration seconds and --max
requests.  --rate paces each connection (requests per second); --burst
connects all connections first, then sends one request on each at once.

Prints one JSON object: requests, answers by kind, elapsed, rps, latency
p50/p99 (ms), the daemon's CPU seconds (utime+stime from /proc/PID/stat) and
CPU per answered lookup (us), and the load generator's own CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float:
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is state (field 3): utime is field 14, stime 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kb(pid: int | None) -> int:
    if not pid:
        return 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[k]


def run(args) -> dict:
    keys = [netstring(f"{args.map} {args.keys.format(i=i)}".encode()) for i in range(args.nkeys)]
    socks = []
    for _ in range(args.conns):
        s = socket.create_connection(("127.0.0.1", args.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    buf = {fd: b"" for fd in by_fd}
    sent_at = {fd: 0.0 for fd in by_fd}
    next_at = {fd: 0.0 for fd in by_fd}
    busy = {fd: False for fd in by_fd}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    kinds: dict[str, int] = {}
    latencies: list[float] = []
    state = {"next_key": 0, "sent": 0}
    limit = args.max if args.max else 1 << 62
    if args.once:
        limit = min(limit, len(keys))
    interval = 1.0 / args.rate if args.rate else 0.0
    perf = time.perf_counter
    samples = []

    cpu0 = proc_cpu(args.pid)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    start = perf()
    deadline = start + args.duration

    def send(fd: int, now: float) -> bool:
        if state["sent"] >= limit:
            return False
        key = keys[state["next_key"] % len(keys)]
        state["next_key"] += 1
        state["sent"] += 1
        sent_at[fd] = now
        busy[fd] = True
        by_fd[fd].send(key)
        return True

    for fd in by_fd:
        next_at[fd] = start
        if not args.rate:
            send(fd, perf())

    answered = 0
    while True:
        now = perf()
        if now >= deadline:
            break
        if not any(busy.values()):
            if state["sent"] >= limit or (args.burst and answered):
                break
        if args.rate:
            for fd in by_fd:
                if not busy[fd] and next_at[fd] <= now:
                    next_at[fd] += interval
                    send(fd, now)
            wake = min([next_at[fd] for fd in by_fd if not busy[fd]] + [deadline])
            timeout = max(0.0, min(wake, deadline) - perf())
        else:
            timeout = max(0.0, deadline - now)
        events = ep.poll(timeout)
        for fd, _ in events:
            try:
                data = by_fd[fd].recv(65536)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit(f"daemon closed connection {fd}")
            b = buf[fd] + data
            while True:
                colon = b.find(b":")
                if colon < 0:
                    break
                n = int(b[:colon])
                end = colon + 1 + n
                if len(b) <= end:
                    break
                payload = b[colon + 1:end]
                b = b[end + 1:]
                t = perf()
                latencies.append(t - sent_at[fd])
                answered += 1
                kind = payload.split(b" ", 1)[0].decode()
                kinds[kind] = kinds.get(kind, 0) + 1
                if len(samples) < 3 and payload not in samples:
                    samples.append(payload)
                busy[fd] = False
                if not args.rate and not args.burst:
                    send(fd, t)
            buf[fd] = b
    elapsed = perf() - start
    cpu1 = proc_cpu(args.pid)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for s in socks:
        s.close()
    cpu = cpu1 - cpu0
    self_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "conns": args.conns,
        "sent": state["sent"],
        "answered": answered,
        "kinds": kinds,
        "elapsed": round(elapsed, 3),
        "rps": round(answered / elapsed, 1) if elapsed else 0.0,
        "p50_ms": round(percentile(latencies, 50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "daemon_cpu_s": round(cpu, 3),
        "cpu_per_lookup_us": round(cpu / answered * 1e6, 1) if answered else None,
        "loadgen_cpu_s": round(self_cpu, 3),
        "daemon_rss_kb": proc_rss_kb(args.pid),
        "samples": [s.decode("utf-8", "replace")[:120] for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max", type=int, default=0, help="at most this many requests (0: no limit)")
    parser.add_argument("--keys", default="d{i}.bench.test")
    parser.add_argument("--nkeys", type=int, default=1)
    parser.add_argument("--once", action="store_true", help="each key at most once")
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s per connection (paced)")
    parser.add_argument("--burst", action="store_true", help="one request per connection, all at once")
    parser.add_argument("--map", default="postfix")
    parser.add_argument("--pid", type=int, default=0)
    args = parser.parse_args()
    json.dump(run(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
