"""
The ``mtasts-twisted`` command (also ``python -m mtasts_twisted``).

Exit codes follow sysexits: 0 for a definite answer, 64 (EX_USAGE) for bad
usage, 65 (EX_DATAERR) for invalid input data, 75 (EX_TEMPFAIL) for a
temporary failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence, TextIO

from mtasts_twisted import __version__
from mtasts_twisted.policy import MTASTSError, parse_policy

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_TEMPFAIL = 75


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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mtasts-twisted`` command."""
    parser = _Parser(prog="mtasts-twisted", description="MTA-STS and TLSRPT for Twisted mail.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    check = commands.add_parser("check-policy", help="validate an MTA-STS policy file (RFC 8461 §3.2)")
    check.add_argument("file", metavar="FILE", help="policy file, or - for standard input")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(run=_check_policy)
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
