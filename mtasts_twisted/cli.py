"""
The ``mtasts-twisted`` command (also ``python -m mtasts_twisted``).

Exit codes follow sysexits: 0 for a definite answer, 64 (EX_USAGE) for bad
usage, 65 (EX_DATAERR) for invalid input data, 75 (EX_TEMPFAIL) for a
temporary failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any, Sequence, TextIO

from mtasts_twisted import __version__
from mtasts_twisted.policy import MTASTSError, Mode, parse_policy

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
DEFAULT_DATA_DIR = "./mtasts-data"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with EX_USAGE (64)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _check_policy(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Validate a policy file against RFC 8461 §3.2 and show what it says."""
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as e:
        err.write(f"mtasts-twisted: cannot read {args.file}: {e.strerror}\n")
        return EX_USAGE
    try:
        policy = parse_policy(data)
    except MTASTSError as e:
        if args.json:
            out.write(json.dumps({"valid": False, "reason": e.reason, "error": str(e)}) + "\n")
        else:
            err.write(f"invalid policy: {e}\n")
        return EX_DATAERR
    if args.json:
        summary = {"valid": True, "mode": policy.mode.value, "mx": list(policy.mx),
                   "max_age": policy.max_age, "extensions": [list(e) for e in policy.extensions]}
        out.write(json.dumps(summary) + "\n")
    else:
        out.write(f"valid policy: mode {policy.mode.value}, max_age {policy.max_age}\n")
        for pattern in policy.mx:
            out.write(f"  mx {pattern}\n")
    return EX_OK


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_ACTIONS = {
    Mode.ENFORCE: "deliver only over STARTTLS with a verified certificate, to MX hosts the policy names",
    Mode.TESTING: "deliver as usual, and report what would have failed under enforce",
    Mode.NONE: "deliver as usual (opportunistic TLS); the domain asks for no enforcement",
    None: "deliver as usual (opportunistic TLS): no MTA-STS policy applies",
}


async def _tlsrpt_record(resolver: Any, alabel: str) -> tuple[dict | None, str | None]:
    """The domain's TLSRPT record as JSON, or the reason there is none."""
    from mtasts_twisted.dns import DNSError
    from mtasts_twisted.policy import NoRecordError, select_tlsrpt_record

    try:
        answer = await resolver.lookup_txt("_smtp._tls." + alabel)
        record = select_tlsrpt_record(answer.strings)
    except NoRecordError:
        return None, None
    except (DNSError, MTASTSError) as e:
        if getattr(e, "reason", "") == "dns-no-record":
            return None, None
        return None, str(e)
    return {"rua": list(record.rua)}, None


async def run_lookup(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO, policy_port: int = 443) -> int:
    """
    C{mtasts-twisted lookup}: the policy of a domain through the persistent
    cache in C{--data-dir} (or a fresh discovery with C{--no-cache}).

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
        fetcher = PolicyFetcher(reactor, trust_roots=args.ca_file, timeout=min(60.0, args.timeout * 6),
                                resolver=resolver, port=policy_port)
    except (ValueError, OSError, MTASTSError) as e:
        return usage(f"--ca-file {args.ca_file}: {e}")
    if args.no_cache:
        store: Any = MemoryStore()
    else:
        try:
            os.makedirs(args.data_dir, mode=0o700, exist_ok=True)
            store = await open_store(default_database_url(args.data_dir), reactor)
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
        await cache.flush()
    finally:
        await cache.stop()
        await store.close()
    fetched = cache.stats["fetches"] > fetches
    policy, entry = lookup.policy, lookup.entry
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
            "valid_until": _iso(entry.valid_end) if policy is not None and entry else None,
            "tlsrpt_record": tlsrpt,
            "result": lookup.result.to_json(),
            "action": _ACTIONS[policy.mode if policy else None],
        }
        if tlsrpt_error:
            obj["tlsrpt_error"] = tlsrpt_error
        out.write(json.dumps(obj) + "\n")
        return EX_OK
    if policy is None:
        out.write(f"{alabel}: no MTA-STS policy\n")
    else:
        out.write(f"{alabel}: MTA-STS policy, mode {policy.mode.value} (id {lookup.record_id})\n")
        for pattern in policy.mx:
            out.write(f"  mx {pattern}\n")
        state = "confirmed now" if lookup.fresh else "NOT confirmed now, cached copy in use"
        origin = "fetched now" if fetched else "from the cache"
        until = _iso(entry.valid_end) if entry else "?"
        out.write(f"  max_age {policy.max_age} s; {origin}, {state}; valid until {until}\n")
    for failure in lookup.result.failures:
        out.write(f"  problem: {failure.result_type.value} ({failure.failure_reason_code})\n")
    if tlsrpt:
        out.write(f"  TLSRPT reports to: {', '.join(tlsrpt['rua'])}\n")
    elif tlsrpt_error:
        out.write(f"  TLSRPT record unusable: {tlsrpt_error}\n")
    else:
        out.write("  no TLSRPT record\n")
    out.write(f"  a sender would {_ACTIONS[policy.mode if policy else None]}\n")
    return EX_OK


def _react(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run an async command on the global reactor and return its exit code."""
    from twisted.internet import defer, task

    codes: list[int] = []

    async def run(reactor: Any) -> None:
        codes.append(await args.run_async(reactor, args, out, err))

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if not codes:
            return e.code if isinstance(e.code, int) and e.code else 70  # EX_SOFTWARE
    return codes[0]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mtasts-twisted`` command."""
    parser = _Parser(prog="mtasts-twisted", description="MTA-STS and TLSRPT for Twisted mail.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    check = commands.add_parser("check-policy", help="validate an MTA-STS policy file (RFC 8461 §3.2)")
    check.add_argument("file", metavar="FILE", help="policy file, or - for standard input")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=_check_policy)

    lookup = commands.add_parser("lookup", help="show a domain's MTA-STS policy and TLSRPT record")
    lookup.add_argument("domain", metavar="DOMAIN")
    lookup.add_argument("--json", action="store_true", help="print one JSON object")
    lookup.add_argument("--nameserver", action="append", metavar="IP[:PORT]",
                        help="ask this DNS server (repeatable; default: /etc/resolv.conf)")
    lookup.add_argument("--ca-file", metavar="PEM", help="trust these CAs for policy hosts, not the system's")
    lookup.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                        help="the policy cache's directory (default %(default)s)")
    lookup.add_argument("--no-cache", action="store_true", help="discover afresh; read and write no cache")
    lookup.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="DNS time budget; the policy fetch gets six times this, at most 60 s")
    lookup.set_defaults(run=_react, run_async=run_lookup)
    _add_operations(commands)
    return parser


# --- operations: cache, report, queue, backup, verify ----------------------------

EX_NOINPUT = 66
EX_UNAVAILABLE = 69


def _database_url(args: argparse.Namespace) -> str:
    from mtasts_twisted.store import default_database_url

    return args.database or default_database_url(args.data_dir)


def _sqlite_path(url: str) -> str | None:
    """The file of an C{sqlite:} URL, L{None} for other databases."""
    from mtasts_twisted.store import _dialect_for

    if not url.lower().startswith("sqlite:"):
        return None
    return _dialect_for(url).path  # type: ignore[attr-defined]


def _missing_database(url: str, command: str, err: TextIO) -> bool:
    path = _sqlite_path(url)
    if path is not None and not os.path.exists(path):
        err.write(f"mtasts-twisted {command}: no database at {path} (check --data-dir or --database)\n")
        return True
    return False


def _entry_json(entry: Any) -> dict[str, Any]:
    row = entry.to_json()
    row["valid_until"] = _iso(entry.valid_end) if entry.policy is not None else None
    return row


async def run_cache(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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

    url = _database_url(args)
    if _missing_database(url, "cache", err):
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
                              f"\tvalid until {_iso(entry.valid_end)}\tlast used {_iso(entry.last_use)}\n")
                else:
                    out.write(f"{entry.domain}\tbackoff until {_iso(entry.backoff_until)}\n")
            return EX_OK
        assert key is not None
        if args.action == "show":
            entry = await cache.entry(key)
            if entry is None:
                err.write(f"{key}: not in the cache\n")
                return EX_NOINPUT
            out.write(json.dumps(_entry_json(entry), indent=None if args.json else 2) + "\n")
            return EX_OK
        if await cache.delete(key):
            out.write(f"{key}: purged\n")
            return EX_OK
        err.write(f"{key}: not in the cache\n")
        return EX_NOINPUT
    finally:
        await store.close()


def _service_options(args: argparse.Namespace) -> Any:
    """The twistd options (and config file) the report commands share with the service."""
    from mtasts_twisted.service import Options

    argv: list[str] = []
    for name in ("config", "data_dir", "database", "ca_file", "report_org", "report_from"):
        value = getattr(args, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), value]
    for server in args.nameserver or ():
        argv += ["--nameserver", server]
    argv += ["--smtp", "none", "--socketmap", "none", "--metrics", "none"]
    options = Options()
    options.parseOptions(argv)
    return options


async def run_report(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted report preview [--day D] [--domain D]} lists the
    pending TLSRPT reports, or with both shows one report's JSON;
    C{report send --now} sends every due report now.
    """
    from twisted.python import usage

    from mtasts_twisted.service import StartupError, open_runtime
    from mtasts_twisted.tlsrpt import NoResultsError

    if args.day is not None:
        try:
            datetime.date.fromisoformat(args.day)
        except ValueError:
            err.write(f"mtasts-twisted report: --day {args.day!r}: not YYYY-MM-DD\n")
            return EX_USAGE
    try:
        config = _service_options(args)
    except usage.UsageError as e:
        err.write(f"mtasts-twisted report: {e}\n")
        return EX_USAGE
    if config["report_settings"] is None:
        err.write("mtasts-twisted report: reports are not configured: give --report-org and"
                  " --report-from (or --config with them)\n")
        return EX_USAGE
    if _missing_database(config["database"], "report", err):
        return EX_NOINPUT
    try:
        runtime = await open_runtime(config, reactor)
    except StartupError as e:
        err.write(f"mtasts-twisted report: {e}\n")
        return EX_CANTCREAT
    try:
        scheduler = runtime.scheduler
        if args.action == "send":
            outcomes = await scheduler.send_now()
            for outcome in outcomes:
                out.write(f"{outcome.day} {outcome.policy_domain}: {outcome.state.value}"
                          f"{' to ' + ', '.join(outcome.delivered_to) if outcome.delivered_to else ''}"
                          f"{' (' + '; '.join(outcome.errors) + ')' if outcome.errors else ''}\n")
            if not outcomes:
                out.write("no reports due\n")
            return EX_OK if all(o.state.value in ("sent", "dropped", "skipped") for o in outcomes) \
                else EX_TEMPFAIL
        if args.day is not None and args.domain is not None:
            try:
                report = await scheduler.preview(args.day, args.domain)
            except NoResultsError as e:
                err.write(f"{e}\n")
                return EX_NOINPUT
            out.write(json.dumps(report, indent=2) + "\n")
            return EX_OK
        pending = await scheduler.pending(args.day, args.domain)
        for p in pending:
            fields = [p.day, p.policy_domain, p.state]
            if p.attempts:
                fields.append(f"attempts {p.attempts}")
            if p.last_error:
                fields.append(p.last_error)
            out.write("\t".join(fields) + "\n")
        if not pending:
            out.write("no pending reports\n")
        return EX_OK
    finally:
        await runtime.close()


def _queue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """C{mtasts-twisted queue list|show ID|retry ID|delete ID} on C{DATA-DIR/queue}."""
    from mtasts_twisted.queue import Queue, UnknownMessageError, queue_delete, queue_list, queue_retry, queue_show

    directory = os.path.join(args.data_dir, "queue")
    if not os.path.isdir(directory):
        if args.action == "list":
            out.write("[]\n" if args.json else "the queue is empty\n")
            return EX_OK
        err.write(f"mtasts-twisted queue: no queue at {directory}\n")
        return EX_NOINPUT
    queue = Queue(directory)
    try:
        if args.action == "list":
            items = queue_list(queue)
            if args.json:
                out.write(json.dumps(items) + "\n")
            elif not items:
                out.write("the queue is empty\n")
            for item in items if not args.json else ():
                out.write(f"{item['id']}\t{item['sender'] or '<>'}\t{len(item['pending'])} pending"
                          f"\tage {int(item['age'])} s\tattempts {item['attempts']}"
                          f"{chr(9) + item['last_error'] if item['last_error'] else ''}\n")
        elif args.action == "show":
            out.write(json.dumps(queue_show(queue, args.id), indent=None if args.json else 2) + "\n")
        elif args.action == "retry":
            queue_retry(queue, args.id)
            out.write(f"{args.id}: due now\n")
        else:
            queue_delete(queue, args.id)
            out.write(f"{args.id}: deleted\n")
    except UnknownMessageError:
        err.write(f"mtasts-twisted queue: no message {args.id}\n")
        return EX_NOINPUT
    return EX_OK


def _sqlite_databases(args: argparse.Namespace) -> list[str]:
    """The SQLite files of the service: the --database one and DATA-DIR/*.sqlite."""
    found = []
    path = _sqlite_path(_database_url(args))
    if path is not None and os.path.isfile(path):
        found.append(os.path.abspath(path))
    if os.path.isdir(args.data_dir):
        for name in sorted(os.listdir(args.data_dir)):
            candidate = os.path.abspath(os.path.join(args.data_dir, name))
            if name.endswith(".sqlite") and os.path.isfile(candidate) and candidate not in found:
                found.append(candidate)
    return found


def _backup(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted backup DIR}: a consistent snapshot of every SQLite
    database of the service (safe while it runs: the SQLite backup API
    copies a consistent state), then checked like C{verify}.
    """
    import sqlite3

    from mtasts_twisted.store import BUSY_TIMEOUT_MS

    url = _database_url(args)
    if _sqlite_path(url) is None:
        err.write(f"mtasts-twisted backup: {url.split('@')[-1]} is not SQLite: back PostgreSQL up with"
                  " pg_dump (e.g. pg_dump -Fc -f mtasts.dump DATABASE)\n")
        return EX_UNAVAILABLE
    databases = _sqlite_databases(args)
    if not databases:
        err.write(f"mtasts-twisted backup: no SQLite database in {args.data_dir}\n")
        return EX_NOINPUT
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    names = [os.path.basename(path) for path in databases]
    clashes = [name for name in names if os.path.exists(os.path.join(args.dir, name))]
    if clashes:
        err.write(f"mtasts-twisted backup: {args.dir} already holds {', '.join(clashes)}: choose an empty"
                  " directory\n")
        return EX_CANTCREAT
    for path, name in zip(databases, names):
        target = os.path.join(args.dir, name)
        partial = target + ".partial"
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                copy = sqlite3.connect(partial)
                try:
                    source.backup(copy)
                    copy.execute("PRAGMA journal_mode = DELETE")
                finally:
                    copy.close()
            finally:
                source.close()
            os.replace(partial, target)
        except (sqlite3.Error, OSError) as e:
            err.write(f"mtasts-twisted backup: {path}: {e}\n")
            if os.path.exists(partial):
                os.unlink(partial)
            return EX_CANTCREAT
        out.write(f"{path} -> {target}\n")
    return _verify_files([os.path.join(args.dir, name) for name in names], out, err)


def _check_snapshot(path: str) -> str:
    """One line about the snapshot at C{path}; raise L{ValueError} if unusable."""
    import sqlite3

    from mtasts_twisted.store import SCHEMA_VERSION

    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise ValueError("not an SQLite database")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except (OSError, sqlite3.Error) as e:
        raise ValueError(str(e)) from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise ValueError("integrity check failed: " + "; ".join(problems)[:300])
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" not in tables:
            raise ValueError("not an mtasts-twisted database (no schema_version)")
        (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if not version or version > SCHEMA_VERSION:
            raise ValueError(f"schema version {version} is not known to this version"
                             f" (it knows 1 to {SCHEMA_VERSION})")
        shelves = [row[0] for row in conn.execute("SELECT name FROM shelves ORDER BY name")]
        missing = [name for name in shelves if name not in tables]
        if missing:
            raise ValueError(f"tables missing: {', '.join(missing)}")
        rows = {name: conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] for name in shelves}
        counts = ", ".join(f"{name} {n}" for name, n in rows.items())
        return f"schema version {version}, rows: {counts or 'no tables'}"
    except sqlite3.Error as e:
        raise ValueError(str(e)) from None
    finally:
        conn.close()


def _verify_files(paths: list[str], out: TextIO, err: TextIO) -> int:
    bad = 0
    for path in paths:
        try:
            out.write(f"OK {path}: {_check_snapshot(path)}\n")
        except ValueError as e:
            err.write(f"BAD {path}: {e}\n")
            bad += 1
    return EX_DATAERR if bad else EX_OK


def _verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted verify DIR}: check a snapshot before restoring it:
    every C{*.sqlite} file opens read-only, passes C{PRAGMA
    integrity_check}, and has a schema version this version knows.
    """
    if not os.path.isdir(args.dir):
        err.write(f"mtasts-twisted verify: {args.dir}: no such directory\n")
        return EX_NOINPUT
    paths = sorted(os.path.join(args.dir, n) for n in os.listdir(args.dir) if n.endswith(".sqlite"))
    if not paths:
        err.write(f"mtasts-twisted verify: no *.sqlite file in {args.dir}\n")
        return EX_NOINPUT
    return _verify_files(paths, out, err)


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                        help="the service's data directory (default %(default)s)")
    parser.add_argument("--database", metavar="URL", help="database URL (default: sqlite:DIR/mtasts.sqlite)")


def _add_operations(commands: Any) -> None:
    cache = commands.add_parser("cache", help="list, show or purge cached policies")
    cache_actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    listing = cache_actions.add_parser("list", help="every cached policy")
    show = cache_actions.add_parser("show", help="one domain's cache entry")
    show.add_argument("domain", metavar="DOMAIN")
    purge = cache_actions.add_parser("purge", help="forget one domain's policy")
    purge.add_argument("domain", metavar="DOMAIN")
    for sub in (listing, show, purge):
        _add_store_options(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(run=_react, run_async=run_cache)

    report = commands.add_parser("report", help="preview or send TLSRPT reports")
    report_actions = report.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    preview = report_actions.add_parser("preview", help="pending reports, or one report's JSON")
    preview.add_argument("--domain", metavar="DOMAIN")
    send = report_actions.add_parser("send", help="send the due reports")
    send.add_argument("--now", action="store_true", required=True, help="now, without the daily delay")
    for sub in (preview, send):
        sub.add_argument("--day", metavar="YYYY-MM-DD", help="only this UTC day" if sub is preview
                         else argparse.SUPPRESS)
        if sub is send:
            sub.set_defaults(domain=None)
        _add_store_options(sub)
        sub.add_argument("--config", metavar="FILE", help="the service's TOML config file")
        sub.add_argument("--nameserver", action="append", metavar="IP[:PORT]")
        sub.add_argument("--ca-file", metavar="PEM")
        sub.add_argument("--report-org", metavar="NAME")
        sub.add_argument("--report-from", metavar="ADDR")
        sub.set_defaults(run=_react, run_async=run_report)

    queue = commands.add_parser("queue", help="inspect and act on the relay queue")
    queue_actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=_Parser)
    subs = [queue_actions.add_parser("list", help="every queued message")]
    for action, text in (("show", "one message's envelope"), ("retry", "make a message due now"),
                         ("delete", "remove a message (no DSN)")):
        sub = queue_actions.add_parser(action, help=text)
        sub.add_argument("id", metavar="ID")
        subs.append(sub)
    for sub in subs:
        sub.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                         help="the service's data directory (default %(default)s)")
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(run=_queue)

    backup = commands.add_parser("backup", help="snapshot every SQLite database (safe while running)")
    backup.add_argument("dir", metavar="DIR")
    _add_store_options(backup)
    backup.set_defaults(run=_backup)
    verify = commands.add_parser("verify", help="check a snapshot made by backup")
    verify.add_argument("dir", metavar="DIR")
    verify.set_defaults(run=_verify)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line C{argv}; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(err)
        return EX_USAGE
    return args.run(args, out, err)
