"""
The operator's policy overrides file (C{--policy-overrides FILE}, TOML),
parsed into frozen L{Override} values.  Pure: no I/O but reading the file
in L{load_overrides}, no clock.

One table per domain, keyed by the domain name (quoted: it has dots)::

    ["example.com"]                 # a preloaded or pinned policy
    action = "enforce"
    mx = ["mx1.example.com", "*.example.net"]
    reason = "publishes no policy yet; ticket 1234"

    ["broken.example"]              # ignore its MTA-STS for a while
    action = "skip"
    until = 2026-12-31              # a TOML date (00:00 UTC) or date-time
    reason = "stale policy lists a retired MX; their ticket 99"

    ["bank.example"]                # DANE is required
    action = "dane-only"

C{until} is required for C{skip} and optional for the others: an override
applies while the clock is before it, then the domain's own policy applies
again.  An error is one line, C{FILE:LINE: what} (L{OverrideFileError}).
"""

from __future__ import annotations

import datetime
import enum
import re
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs

from mtasts_twisted.policy import DomainError, Mode, Policy, PolicySyntaxError, parse_policy, to_alabel

__all__ = [
    "ENFORCE_MAX_AGE",
    "Override",
    "OverrideFileError",
    "OverrideKind",
    "load_overrides",
    "parse_overrides",
]

#: The C{max_age} of an C{enforce} override's policy (it is never cached:
#: the file is the source, until it changes).
ENFORCE_MAX_AGE = 86400

_KEYS = frozenset({"action", "mx", "until", "reason"})


class OverrideFileError(ValueError):
    """
    The overrides file cannot be used; C{str()} is one line, C{FILE:LINE:
    what} (C{FILE: what} when no line applies).

    @ivar path: the file.
    @ivar line: the 1-based line, or L{None}.
    """

    def __init__(self, path: str, line: int | None, what: str) -> None:
        self.path = path
        self.line = line
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {what}")


class OverrideKind(enum.Enum):
    """
    What an override does to a domain.

    @cvar ENFORCE: apply the override's own C{enforce} policy (its C{mx}
        list) instead of whatever the domain publishes or fails to.
    @cvar SKIP: ignore the domain's MTA-STS policy (deliver as without
        one) until C{until}.
    @cvar DANE_ONLY: the domain requires DANE (Postfix's C{dane-only}).
    """

    ENFORCE = "enforce"
    SKIP = "skip"
    DANE_ONLY = "dane-only"


@attrs.frozen
class Override:
    """
    One domain's override.

    @ivar domain: the domain, A-labels, lower case.
    @ivar kind: the L{OverrideKind}.
    @ivar policy: for C{enforce}, the L{Policy} it applies (mode C{enforce},
        the C{mx} patterns, max_age L{ENFORCE_MAX_AGE}); else L{None}.
    @ivar until: POSIX seconds at which it stops applying, or L{None}.
    @ivar reason: the operator's words, or L{None}.
    @ivar source: C{FILE:LINE} of its table, for logs and C{lookup}.
    """

    domain: str
    kind: OverrideKind
    policy: Policy | None = None
    until: float | None = None
    reason: str | None = None
    source: str = ""

    def active(self, now: float) -> bool:
        """Does it apply at C{now} (POSIX seconds)?"""
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        """The C{lookup --json} form: C{kind}, C{mx}, C{until} (ISO or null), C{reason}, C{source}."""
        until = None
        if self.until is not None:
            until = datetime.datetime.fromtimestamp(self.until, datetime.timezone.utc).isoformat()
        return {
            "kind": self.kind.value,
            "mx": list(self.policy.mx) if self.policy is not None else None,
            "until": until,
            "reason": self.reason,
            "source": self.source,
        }


def _header_lines(text: str) -> dict[str, int]:
    """Table name → the line of its header (C{["example.com"]}), for error messages."""
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped.startswith("[") or stripped.startswith("[["):
            continue
        try:
            keys = tomllib.loads(stripped)
        except tomllib.TOMLDecodeError:
            continue
        for key in keys:
            lines.setdefault(key, number)
    return lines


def _field_line(text: str, header: int | None, field: str) -> int | None:
    """The line of C{field = ...} in the table whose header is on line C{header}."""
    if header is None:
        return None
    pattern = re.compile(rf"\s*{re.escape(field)}\s*=")
    for number, line in enumerate(text.splitlines()[header:], header + 1):
        if line.strip().startswith("["):
            break
        if pattern.match(line):
            return number
    return header


def _until(value: Any) -> float:
    """A TOML date (00:00 UTC) or offset date-time as POSIX seconds."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise ValueError("until: a date-time needs an offset (e.g. Z), or give a date")
        return value.timestamp()
    if isinstance(value, datetime.date):
        return datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.timezone.utc).timestamp()
    raise ValueError("until: expected a date (2026-12-31) or a date-time with offset")


def _enforce_policy(mx: Any) -> Policy:
    if not isinstance(mx, list) or not mx or not all(isinstance(m, str) for m in mx):
        raise ValueError("mx: expected a non-empty list of MX host patterns")
    # The policy grammar checks the patterns (RFC 8461 §3.2, §4.1).
    text = "version: STSv1\r\nmode: enforce\r\n" + "".join(f"mx: {m}\r\n" for m in mx)
    text += f"max_age: {ENFORCE_MAX_AGE}\r\n"
    try:
        return parse_policy(text)
    except PolicySyntaxError as e:
        raise ValueError(f"mx: {e}") from None


def _one(path: str, text: str, lines: Mapping[str, int], name: str, table: Any) -> Override:
    header = lines.get(name)

    def fail(what: str, field: str | None = None) -> OverrideFileError:
        line = _field_line(text, header, field) if field else header
        return OverrideFileError(path, line, what)

    if not isinstance(table, dict):
        raise fail(f"{name!r}: expected a table ([\"{name}\"] with action = ...)")
    try:
        domain = to_alabel(name)
    except DomainError as e:
        raise fail(f"{name!r}: not a domain name ({e})") from None
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise fail(f"{name}: unknown key {unknown[0]!r} (action, mx, until, reason)", unknown[0])
    action = table.get("action")
    try:
        kind = OverrideKind(action)
    except ValueError:
        raise fail(f"{name}: action {action!r}: expected enforce, skip or dane-only", "action") from None
    policy = None
    if kind is OverrideKind.ENFORCE:
        try:
            policy = _enforce_policy(table.get("mx"))
        except ValueError as e:
            raise fail(f"{name}: {e}", "mx") from None
    elif "mx" in table:
        raise fail(f"{name}: mx is for action enforce only", "mx")
    until = None
    if "until" in table:
        try:
            until = _until(table["until"])
        except ValueError as e:
            raise fail(f"{name}: {e}", "until") from None
    elif kind is OverrideKind.SKIP:
        raise fail(f"{name}: skip needs until = DATE (a skip never ends by itself otherwise)")
    reason = table.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise fail(f"{name}: reason must be a string", "reason")
    assert policy is None or policy.mode is Mode.ENFORCE
    return Override(domain, kind, policy, until, reason or None, f"{path}:{header}" if header else path)


def parse_overrides(text: str, path: str = "<overrides>") -> dict[str, Override]:
    """
    Parse the text of an overrides file.

    @param path: the file's name, for error messages and L{Override.source}.
    @return: the overrides by A-label domain.
    @raise OverrideFileError: the first problem, in one line.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if match:
            what = message[: match.start()].strip()
            raise OverrideFileError(path, int(match.group(1)), f"not valid TOML: {what} (column {match.group(2)})")
        raise OverrideFileError(path, None, f"not valid TOML: {message}") from None
    lines = _header_lines(text)
    overrides: dict[str, Override] = {}
    for name, table in data.items():
        override = _one(path, text, lines, name, table)
        if override.domain in overrides:
            raise OverrideFileError(path, lines.get(name), f"{name}: the domain {override.domain} is listed twice")
        overrides[override.domain] = override
    return overrides


def load_overrides(path: str) -> dict[str, Override]:
    """
    Read and parse the overrides file at C{path} (L{parse_overrides}).

    @raise OverrideFileError: it cannot be read or is malformed (one line).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise OverrideFileError(path, None, f"cannot read it: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OverrideFileError(path, None, "not UTF-8") from None
    return parse_overrides(text, path)
