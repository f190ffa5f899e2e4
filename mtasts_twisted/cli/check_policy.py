"""
C{mtasts-twisted check-policy FILE}: validate an MTA-STS policy file
(RFC 8461 §3.2) and show what it says, or every error in it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from mtasts_twisted.cli.common import EX_DATAERR, EX_NOINPUT, EX_OK
from mtasts_twisted.policy import PolicySyntaxError, parse_policy, policy_errors

__all__ = ["run_check_policy"]


def _message(number: int | None, error: PolicySyntaxError) -> str:
    """An error's text, naming its line."""
    text = str(error)
    if number is None or text.startswith(f"line {number}:"):
        return text
    return f"line {number}: {text}"


def run_check_policy(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Validate a policy file against RFC 8461 §3.2 and show what it says.

    @return: 0 when valid, 65 (EX_DATAERR) with every error when not, 66
        (EX_NOINPUT) when the file cannot be read.
    """
    try:
        if args.file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as f:
                data = f.read()
    except OSError as e:
        err.write(f"mtasts-twisted check-policy: cannot read {args.file}: {e.strerror}\n")
        return EX_NOINPUT
    errors = policy_errors(data)
    if errors:
        if args.json:
            listed = [{"line": number, "reason": error.reason, "error": _message(number, error)}
                      for number, error in errors]
            out.write(json.dumps({"valid": False, "reason": listed[0]["reason"], "error": listed[0]["error"],
                                  "errors": listed}) + "\n")
        else:
            for number, error in errors:
                err.write(f"invalid policy: {_message(number, error)}\n")
        return EX_DATAERR
    policy = parse_policy(data)
    if args.json:
        summary = {"valid": True, "mode": policy.mode.value, "mx": list(policy.mx),
                   "max_age": policy.max_age, "extensions": [list(e) for e in policy.extensions]}
        out.write(json.dumps(summary) + "\n")
    else:
        out.write(f"valid policy: mode {policy.mode.value}, max_age {policy.max_age}\n")
        for pattern in policy.mx:
            out.write(f"  mx {pattern}\n")
    return EX_OK
