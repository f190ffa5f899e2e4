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
    from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
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
                                name_resolver=DNSHostnameResolver(resolver), port=policy_port)
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
    return parser


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
