"""
C{mtasts-twisted check-policy FILE}: validate an MTA-STS policy file
(RFC 8461 §3.2) and show what it says.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from mtasts_twisted.cli.common import EX_DATAERR, EX_OK, EX_USAGE
from mtasts_twisted.policy import MTASTSError, parse_policy

__all__ = ["run_check_policy"]


def run_check_policy(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
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
