"""
The ``mtasts-twisted`` command (also ``python -m mtasts_twisted``).

Exit codes follow sysexits: 0 for a definite answer, 64 (EX_USAGE) for bad
usage, 65 (EX_DATAERR) for invalid input data, 75 (EX_TEMPFAIL) for a
temporary failure.

This module holds L{main} and the argument parser; each command group is a
module of this package: L{check_policy <mtasts_twisted.cli.check_policy>},
L{lookup <mtasts_twisted.cli.lookup>}, L{cache <mtasts_twisted.cli.cache>},
L{report <mtasts_twisted.cli.report>}, L{queue <mtasts_twisted.cli.queue>}
and L{backup <mtasts_twisted.cli.backup>} (C{backup} and C{verify}), on the
shared L{common <mtasts_twisted.cli.common>}.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from mtasts_twisted import __version__
from mtasts_twisted.cli.backup import run_backup, run_verify
from mtasts_twisted.cli.cache import run_cache
from mtasts_twisted.cli.check_policy import run_check_policy
from mtasts_twisted.cli.common import (
    DEFAULT_DATA_DIR,
    EX_CANTCREAT,
    EX_DATAERR,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    Parser,
    add_store_options,
    react,
)
from mtasts_twisted.cli.lookup import run_lookup
from mtasts_twisted.cli.queue import run_queue
from mtasts_twisted.cli.report import run_report

__all__ = [
    "DEFAULT_DATA_DIR",
    "EX_CANTCREAT",
    "EX_DATAERR",
    "EX_NOINPUT",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "build_parser",
    "main",
    "run_cache",
    "run_lookup",
    "run_report",
]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mtasts-twisted`` command."""
    parser = Parser(prog="mtasts-twisted", description="MTA-STS and TLSRPT for Twisted mail.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    check = commands.add_parser("check-policy", help="validate an MTA-STS policy file (RFC 8461 §3.2)")
    check.add_argument("file", metavar="FILE", help="policy file, or - for standard input")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=run_check_policy)

    lookup = commands.add_parser("lookup", help="show a domain's MTA-STS policy and TLSRPT record")
    lookup.add_argument("domain", metavar="DOMAIN")
    lookup.add_argument("--json", action="store_true", help="print one JSON object")
    lookup.add_argument("--nameserver", action="append", metavar="IP[:PORT]",
                        help="ask this DNS server (repeatable; default: /etc/resolv.conf)")
    lookup.add_argument("--ca-file", metavar="PEM", help="trust these CAs for policy hosts, not the system's")
    lookup.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                        help="the policy cache's directory (default %(default)s)")
    lookup.add_argument("--dane", action="store_true",
                        help="per MX host: DANE (RFC 7672) status and which policy decides delivery")
    lookup.add_argument("--no-cache", action="store_true", help="discover afresh; read and write no cache")
    lookup.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="DNS time budget; the policy fetch gets six times this, at most 60 s")
    lookup.add_argument("--policy-overrides", metavar="FILE", help="apply the service's policy overrides file")
    lookup.set_defaults(run=react, run_async=run_lookup)
    _add_operations(commands)
    return parser


def _add_operations(commands: argparse._SubParsersAction[Parser]) -> None:
    cache = commands.add_parser("cache", help="list, show or purge cached policies")
    cache_actions = cache.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    listing = cache_actions.add_parser("list", help="every cached policy")
    show = cache_actions.add_parser("show", help="one domain's cache entry")
    show.add_argument("domain", metavar="DOMAIN")
    purge = cache_actions.add_parser("purge", help="forget one domain's policy")
    purge.add_argument("domain", metavar="DOMAIN")
    for sub in (listing, show, purge):
        add_store_options(sub)
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(run=react, run_async=run_cache)

    report = commands.add_parser("report", help="preview or send TLSRPT reports")
    report_actions = report.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    preview = report_actions.add_parser("preview", help="pending reports, or one report's JSON")
    preview.add_argument("--domain", metavar="DOMAIN")
    send = report_actions.add_parser("send", help="send the due reports")
    send.add_argument("--now", action="store_true", required=True, help="now, without the daily delay")
    for sub in (preview, send):
        sub.add_argument("--day", metavar="YYYY-MM-DD", help="only this UTC day" if sub is preview
                         else argparse.SUPPRESS)
        if sub is send:
            sub.set_defaults(domain=None)
        add_store_options(sub)
        sub.add_argument("--config", metavar="FILE", help="the service's TOML config file")
        sub.add_argument("--nameserver", action="append", metavar="IP[:PORT]")
        sub.add_argument("--ca-file", metavar="PEM")
        sub.add_argument("--report-org", metavar="NAME", help="TLSRPT organization-name"
                         + (" (not needed to preview)" if sub is preview else ""))
        sub.add_argument("--report-from", metavar="ADDR", help="From of mailed reports"
                         + (" (not needed to preview)" if sub is preview else ""))
        if sub is send:
            sub.add_argument("--report-dkim-key", metavar="PEM", help="DKIM-sign mailed reports with this key")
            sub.add_argument("--report-dkim-selector", metavar="SEL", help="the DKIM selector of the key")
            sub.add_argument("--report-unsigned", action="store_true",
                             help="mail reports unsigned when no DKIM key is given (RFC 8460 §3 requires one)")
        sub.set_defaults(run=react, run_async=run_report)

    queue = commands.add_parser("queue", help="inspect and act on the relay queue")
    queue_actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
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
        sub.set_defaults(run=run_queue)

    backup = commands.add_parser("backup", help="snapshot every SQLite database (safe while running)")
    backup.add_argument("dir", metavar="DIR")
    add_store_options(backup)
    backup.set_defaults(run=run_backup)
    verify = commands.add_parser("verify", help="check a snapshot made by backup")
    verify.add_argument("dir", metavar="DIR")
    verify.set_defaults(run=run_verify)


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
