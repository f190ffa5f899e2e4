#!/usr/bin/env python
"""
Run the reliability tests and write tests/RELIABILITY.md with the figures.

    python tests/make_reliability_report.py [--examples N] [--jobs J] [--output PATH] [--no-crash]

It runs tests.test_faults, tests.test_downgrade, tests.test_fuzz and
tests.test_limits (and tests.test_crash when it exists) under trial with
C{MTASTS_FUZZ_EXAMPLES=N} (default 300) and C{MTASTS_RELIABILITY_STATS}
pointing at a scratch file where the tests count what they did (fault
cases survived, fuzz examples tried, kill iterations, lost messages), then
writes the figures and the table of limits, whose defaults are read from
the code itself so the table cannot drift from it.

Exit status: 0 when every test passed, 1 otherwise (the report is written
either way, saying so).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODULES = [
    "tests.test_faults", "tests.test_downgrade", "tests.test_fuzz", "tests.test_limits",
    # Hardening II (issue 17): the probes below come from these.
    "tests.test_metrics_http", "tests.test_fd_exhaustion", "tests.test_intake_commands",
    "tests.test_intake_spool", "tests.test_envelope", "tests.test_periodic",
]

#: What each probe measures (tests call tests.test_faults.probe); the report
#: shows the largest value seen.
PROBES = {
    "metrics_never_reading_buffered_bytes":
        "metrics endpoint: bytes buffered for a client that pipelines 2000 GETs and never reads",
    "socketmap_never_reading_buffered_bytes":
        "socketmap: bytes buffered for a client that pipelines requests and never reads",
    "fd_exhaustion_recovery_seconds":
        "after every file descriptor was taken and released: seconds until the retried message reached the MX",
    "fd_exhaustion_socketmap_kept":
        "1030 idle socketmap connections under ulimit -n 1024: still open after two queue polls (idle ones"
        " are closed to make room and at the first-request timeout)",
}
OPTIONAL = ["tests.test_crash"]


def run(examples: int, jobs: int) -> tuple[dict, dict, str, float, list[str]]:
    modules = MODULES + [m for m in OPTIONAL if os.path.exists(os.path.join(ROOT, *m.split(".")) + ".py")]
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        stats_path = os.path.join(tmp, "stats.jsonl")
        env = dict(os.environ, MTASTS_FUZZ_EXAMPLES=str(examples), MTASTS_RELIABILITY_STATS=stats_path)
        command = [sys.executable, "-m", "twisted.trial", "--temp-directory", os.path.join(tmp, "_trial_temp")]
        if jobs > 1:
            command.append(f"-j{jobs}")
        started = time.monotonic()
        proc = subprocess.run(command + modules, cwd=ROOT, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
        counts: collections.Counter[str] = collections.Counter()
        probes: dict[str, float] = {}
        if os.path.exists(stats_path):
            with open(stats_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        event = json.loads(line)
                        if event["kind"] == "probe":
                            probes[event["name"]] = max(probes.get(event["name"], event["value"]), event["value"])
                        else:
                            counts[event["kind"]] += int(event["n"])
        # tests/test_crash.py writes its figures to crash-figures.json in
        # trial's temp directory (a worker's subdirectory under -j).
        crash: dict = {}
        for dirpath, _, filenames in os.walk(tmp):
            if "crash-figures.json" in filenames:
                with open(os.path.join(dirpath, "crash-figures.json"), encoding="utf-8") as f:
                    crash = json.load(f)
    output = proc.stdout + proc.stderr
    summary: dict = {"returncode": proc.returncode}
    ran = re.search(r"Ran (\d+) tests? in ([\d.]+)s", output)
    summary["ran"] = int(ran.group(1)) if ran else 0
    verdict = re.search(r"^(PASSED|FAILED) \((.*)\)", output, re.M)
    summary["verdict"] = verdict.group(1) if verdict else "UNKNOWN"
    summary["detail"] = verdict.group(2) if verdict else ""
    summary["crash"] = crash
    summary["probes"] = probes
    return summary, dict(counts), output, elapsed, modules


def limits() -> list[tuple[str, str, str, str]]:
    """(module, setting, default, what happens when hit), read from the code."""
    from mtasts_twisted import dns as mdns
    from mtasts_twisted import fetch, policy
    from mtasts_twisted.cache import CacheSettings
    from mtasts_twisted.delivery import QUIT_TIMEOUT, DeliverySettings, _ClientProtocol
    from mtasts_twisted.socketmap import MAX_REPLY, SocketmapSettings

    sm = SocketmapSettings()
    ds = DeliverySettings()
    cs = CacheSettings()
    rows = [
        ("socketmap", "SocketmapSettings.max_request", f"{sm.max_request} bytes",
         "request netstring longer: earlier requests answered, connection closed (no buffering of the rest)"),
        ("socketmap", "SocketmapSettings.idle_timeout", f"{sm.idle_timeout:g} s",
         "no complete request for that long (partial bytes do not count: slowloris) and none pending: closed"),
        ("socketmap", "SocketmapSettings.max_connections", str(sm.max_connections),
         "at the cap the oldest idle connection is closed to make room (refused only if all wait for a lookup)"),
        ("socketmap", "SocketmapSettings.max_connections_per_client", str(sm.max_connections_per_client),
         "as the total cap, per client IP"),
        ("socketmap", "SocketmapSettings.first_request_timeout", f"{sm.first_request_timeout:g} s",
         "no request at all for that long: closed"),
        ("socketmap", "SocketmapSettings.max_pipeline", str(sm.max_pipeline),
         "answers waiting for lookups: reading stops until they are sent"),
        ("socketmap", "MAX_REPLY", f"{MAX_REPLY} characters", "answer would be longer: attributes dropped / TEMP"),
        ("socketmap", "SocketmapSettings.memo_size", str(sm.memo_size), "oldest memoised key/answer evicted"),
        ("dns", "DNSResolver(timeout=)", f"{mdns.DEFAULT_TIMEOUT:g} s", "one try abandoned, next server/attempt"),
        ("dns", "DNSResolver(budget=)", f"{mdns.DEFAULT_BUDGET:g} s", "lookup fails temporarily (DNSTemporaryError)"),
        ("dns", "DNSResolver(attempts=)", str(mdns.DEFAULT_ATTEMPTS), "rounds over the nameservers, then temporary failure"),
        ("dns", "MAX_TCP_REPLY", f"{mdns.MAX_TCP_REPLY} bytes", "larger TCP frame: try failed; frames without our ID ignored until the timeout"),
        ("dns", "EDNS_PAYLOAD", f"{mdns.EDNS_PAYLOAD} bytes", "larger answers come truncated: retried over TCP"),
        ("dns", "MAX_CNAME_CHAIN", str(mdns.MAX_CNAME_CHAIN), "longer chain or a loop: temporary failure"),
        ("dns", "DNSResolver(cache_size=)", str(mdns.DEFAULT_CACHE_SIZE), "least recently used answer evicted"),
        ("dns", "MAX_CACHE_TTL / MAX_NEGATIVE_TTL", f"{mdns.MAX_CACHE_TTL} s / {mdns.MAX_NEGATIVE_TTL} s",
         "TTLs capped"),
        ("fetch", "PolicyFetcher(timeout=)", f"{fetch.DEFAULT_TIMEOUT:g} s",
         "whole fetch (resolve, connect, TLS, headers, body) aborted: sts-policy-fetch-error, backoff"),
        ("fetch/policy", "MAX_POLICY_SIZE (PolicyFetcher(max_size=))", f"{policy.MAX_POLICY_SIZE} bytes",
         "larger Content-Length refused, streamed body cut at the cap: sts-policy-invalid, backoff"),
        ("policy", "MAX_MAX_AGE", f"{policy.MAX_MAX_AGE} s", "larger max_age clamped"),
        ("cache", "CacheSettings.backoff", f"{cs.backoff:g} s", "no refetch of a failing id before it ends"),
        ("cache", "CacheSettings.front_size", str(cs.front_size), "in-memory front evicts least recently used"),
        ("cache", "(coalescing)", "1 query + 1 fetch", "concurrent get()s of one domain share them"),
        ("delivery", "_ClientProtocol.MAX_LENGTH", f"{_ClientProtocol.MAX_LENGTH} octets",
         "longer reply line: session aborted, next MX / transient"),
        ("delivery", "_ClientProtocol.MAX_REPLY_LINES", str(_ClientProtocol.MAX_REPLY_LINES),
         "more lines in one reply: session aborted, next MX / transient"),
        ("delivery", "DeliverySettings.connect_timeout", f"{ds.connect_timeout:g} s", "next address / MX"),
        ("delivery", "DeliverySettings.reply_timeout", f"{ds.reply_timeout:g} s",
         "per reply: session aborted (after the final dot: transient, not retried elsewhere)"),
        ("delivery", "DeliverySettings.session_timeout", f"{ds.session_timeout:g} s", "session aborted"),
        ("delivery", "QUIT_TIMEOUT", f"{QUIT_TIMEOUT:g} s", "stop waiting for the QUIT reply"),
        ("delivery", "DeliverySettings.max_mx_hosts", str(ds.max_mx_hosts), "further MX hosts not tried"),
        ("delivery", "DeliverySettings.max_addresses_per_host", str(ds.max_addresses_per_host),
         "further addresses not tried"),
        ("delivery", "(message)", "64 KiB chunks", "message streamed, never read whole"),
    ]
    try:
        from mtasts_twisted.relay import RelaySettings
    except Exception:  # noqa: BLE001 - the relay may not exist yet
        rows.append(("relay", "(not importable)", "-", "queue size, connections per client: see relay.py"))
    else:
        rs = RelaySettings()
        relay_rows = [
            ("max_message_size", " octets", "552 5.3.4 (at MAIL for a declared SIZE=, else at the dot)"),
            ("max_recipients", "", "452 4.5.3 to further RCPT"),
            ("max_queue_messages", "", "452 4.3.1 (queue full), queue intact"),
            ("max_queue_bytes", " octets", "452 4.3.1 (queue full), queue intact"),
            ("max_connections", "", "421 4.7.0 and close"),
            ("max_connections_per_ip", "", "421 4.7.0 and close (all of loopback is one client)"),
            ("idle_timeout", " s", "421 4.4.2 and close (only complete lines reset it)"),
            ("max_session_time", " s", "421 4.4.2 and close"),
            ("max_line_length", " octets", "500 5.5.2 and close"),
            ("concurrency", "", "further deliveries wait for a slot"),
            ("concurrency_per_domain", "", "further deliveries to that domain wait"),
        ]
        for name, unit, hit in relay_rows:
            if hasattr(rs, name):
                value = getattr(rs, name)
                rows.append(("relay", f"RelaySettings.{name}", f"{value:g}{unit}" if isinstance(value, float)
                             else f"{value}{unit}", hit))
    return rows


def write(path: str, summary: dict, counts: dict, elapsed: float, examples: int, jobs: int,
          modules: list[str]) -> None:
    ok = summary["verdict"] == "PASSED"
    crash = summary.get("crash") or {}
    kills = crash.get("kill_iterations", counts.get("kill_iterations", 0))
    lost = crash.get("lost", counts.get("lost_messages", 0))
    lines = [
        "# Reliability figures",
        "",
        "Generated by `python tests/make_reliability_report.py` — do not edit by hand; re-run it to",
        "re-measure.  Issues 9 and 17: fault matrix, downgrade attacks, fuzzing, limits, crash safety,",
        "hardening probes.",
        "",
        f"- Generated: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Python {sys.version.split()[0]}, {jobs} trial job(s), wall time {elapsed:.1f} s",
        f"- Modules: {', '.join(modules)}",
        f"- Result: **{summary['verdict']}** ({summary['detail']})",
        "",
        "| Figure | Value |",
        "|---|---|",
        f"| Test cases run | {summary['ran']} |",
        f"| Fault cases survived (outcome + TLSRPT right, timeouts fired, no fd / delayed call / Deferred leak, healthy after) | {counts.get('fault_case', 0)} |",
        f"| Downgrade attacks refused or deferred (nothing in plaintext, nothing over unverified TLS) | {counts.get('downgrade_case', 0)} |",
        f"| Fuzz examples tried (MTASTS_FUZZ_EXAMPLES={examples}) | {counts.get('fuzz_examples', 0)} |",
        f"| Limit boundaries checked | {counts.get('limit_case', 0)} |",
        f"| kill -9 iterations of the relay | {kills if kills else 'not run (no crash-figures.json from tests/test_crash.py)'} |",
        f"| Lost messages | {lost if kills else 'n/a (no crash runs)'} |",
        "",
    ]
    if crash:
        lines += ["## Crash safety figures (tests/test_crash.py)", "", "| Figure | Value |", "|---|---|"]
        lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in sorted(crash.items())]
        lines.append("")
    probes = summary.get("probes") or {}
    lines += ["## Hardening II probes (issue 17)", "", "Measured by the tests (which assert bounds on",
              "bytes and counts, never these figures); the largest value seen.", "",
              "| Probe | Value |", "|---|---|"]
    for name, what in PROBES.items():
        value = probes.get(name)
        lines.append(f"| {what} | {'not measured' if value is None else f'{value:g}'} |")
    lines.append("")
    lines += [
        "## Limits (caps and timeouts on what a peer controls)",
        "",
        "Defaults read from the code when this file was generated.",
        "",
        "| Module | Setting | Default | When hit |",
        "|---|---|---|---|",
    ]
    for module, setting, default, hit in limits():
        lines.append(f"| {module} | `{setting}` | {default} | {hit} |")
    lines += [
        "",
        "## Known gaps",
        "",
        "- `max_addresses_per_host` needs several loopback addresses (tests use 127.0.0.1 only).",
        "- RSS under a never-reading socketmap client is measured by a probe script outside the suite",
        "  (issue 17's figure: flat at 53.7 MiB over 40 s after the fix, 53 → 852 MiB before); the",
        "  suite asserts the bytes held per client instead.",
        "",
    ]
    if not ok:
        lines += ["## Failures", "", "The run did not pass: see the trial output.", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--examples", type=int, default=int(os.environ.get("MTASTS_FUZZ_EXAMPLES", 300)))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "RELIABILITY.md"))
    parser.add_argument("--no-crash", action="store_true", help="leave out tests.test_crash (slow)")
    args = parser.parse_args(argv)
    if args.no_crash:
        OPTIONAL.clear()
    if importlib.util.find_spec("mtasts_twisted") is None:
        sys.path.insert(0, ROOT)
    summary, counts, output, elapsed, modules = run(args.examples, args.jobs)
    write(args.output, summary, counts, elapsed, args.examples, args.jobs, modules)
    sys.stdout.write(output[-3000:] if summary["verdict"] != "PASSED" else "")
    print(f"{summary['verdict']}: {summary['ran']} tests; {counts}; wrote {args.output}")
    return 0 if summary["verdict"] == "PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())
