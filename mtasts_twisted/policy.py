"""
The MTA-STS and TLSRPT grammar: TXT records, policy text, MX patterns, domains.

Pure code: no I/O, no reactor.  Everything here follows RFC 8461 §3.1/§3.2/§4.1
and RFC 8460 §3, with the rulings of docs/design.rst where the RFCs leave a
choice.  Rejecting a published record or policy makes a sender act as if the
domain had none (it fails open), so where a choice exists the rulings keep
what the publisher meant: a later duplicate field is ignored whatever its
value; ``v=STSv1 ;`` is a record, but one that starts exactly ``v=STSv1;``
wins; ``max_age`` is clamped; blank lines and a leading BOM in a policy are
ignored; an LDH ``xn--`` label is taken as written.

Every error derives from L{MTASTSError} and carries a stable machine reason
(L{MTASTSError.reason}) that TLSRPT reuses as ``failure-reason-code``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Callable, Iterable, TypeVar

import attrs
import idna

# RFC 8461 §3.2: "max_age" is at most 31557600 (about one year).
MAX_MAX_AGE = 31557600
# RFC 8461 §3.3: senders may cap the policy body; 64 KiB is what everyone uses.
MAX_POLICY_SIZE = 65536
# RFC 1035 §2.3.4 / RFC 5321 §4.5.3.1.2
MAX_LABEL_LENGTH = 63
MAX_NAME_LENGTH = 253


class MTASTSError(Exception):
    """
    Base of every error raised by mtasts_twisted.

    @ivar reason: a short, stable, machine-readable reason, used as the
        RFC 8460 ``failure-reason-code`` where one applies.
    """

    reason: str = "mta-sts-error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class DomainError(MTASTSError, ValueError):
    """A name is not a valid domain name for MTA-STS (or is an address literal)."""

    reason = "invalid-domain"


class NotARecordError(MTASTSError):
    """A TXT string is not a record of the kind asked for at all."""

    reason = "not-a-record"


class NotSTSRecordError(NotARecordError):
    """A TXT string does not start with ``v=STSv1`` and ``;``: some other TXT."""

    reason = "not-an-sts-record"


class NotTLSRPTRecordError(NotARecordError):
    """A TXT string does not start with ``v=TLSRPTv1`` and ``;``."""

    reason = "not-a-tlsrpt-record"


class RecordSyntaxError(MTASTSError):
    """A TXT string is an STS (or TLSRPT) record, but a malformed one."""

    reason = "record-syntax-error"


class NoRecordError(MTASTSError):
    """A lookup found no STS (or TLSRPT) record."""

    reason = "no-record"


class MultipleRecordsError(MTASTSError):
    """A lookup found more than one STS (or TLSRPT) record (RFC 8461 §3.1)."""

    reason = "multiple-mta-sts-records"


class PolicySyntaxError(MTASTSError):
    """A policy text is off the RFC 8461 §3.2 grammar, too large or not UTF-8."""

    reason = "policy-syntax-error"


class Mode(str, enum.Enum):
    """RFC 8461 §5 policy modes."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


def _pairs(value: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


# --- domains -----------------------------------------------------------------

_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def is_address_literal(name: str) -> bool:
    """
    Is C{name} an address literal (C{[192.0.2.1]}, C{[IPv6:...]}, or a bare IP)?

    Address literals have no MTA-STS policy (RFC 8461 §3.4 applies to domains).
    """
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        return True
    if ":" not in text and not text.rstrip(".")[-1:].isdigit():
        return False  # fast path: IPv4 ends in a digit, IPv6 has colons
    try:
        ipaddress.ip_address(text.rstrip("."))
    except ValueError:
        return False
    return True


def _check_alabel_name(name: str) -> str:
    """
    Validate an ASCII, lower-case name label by label; return it.

    Ruling (RFC 8461 §3.2 ``Domain`` is RFC 5321 §4.1.2's: LDH labels): an
    ASCII label is checked for its LDH syntax and length only.  An ``xn--``
    label is an A-label as written; whether its Punycode decodes to code
    points IDNA 2008 allows is the registry's business (RFC 5891 §5.4 lets
    a lookup application skip that test), and rejecting it here would drop
    a published policy (fail open) or refuse mail for a name the DNS serves.
    """
    if not name:
        raise DomainError("empty domain name")
    if len(name) > MAX_NAME_LENGTH:
        raise DomainError(f"domain name longer than {MAX_NAME_LENGTH} octets: {name[:64]}...")
    for label in name.split("."):
        if not label:
            raise DomainError(f"empty label in domain name {name!r}")
        if len(label) > MAX_LABEL_LENGTH:
            raise DomainError(f"label longer than {MAX_LABEL_LENGTH} octets in {name!r}")
        if not _LDH_LABEL.match(label):
            raise DomainError(f"invalid label {label!r} in {name!r}: letters, digits, hyphens")
    return name


def to_alabel(domain: str) -> str:
    """
    Normalise a domain to lower-case A-labels without a trailing dot.

    Unicode input is mapped with UTS 46 (non-transitional) and each U-label
    is encoded with IDNA 2008; ASCII labels, A-labels included, are passed
    through as written (lower-cased) once their LDH syntax is checked.

    @raise DomainError: for an address literal, an empty or over-long name or
        label, a label off the LDH syntax, or a U-label IDNA 2008 rejects.
    """
    if not isinstance(domain, str):
        raise DomainError(f"domain must be text, not {type(domain).__name__}")
    name = domain.strip()
    if name.endswith("."):
        name = name[:-1]
    if is_address_literal(name):
        raise DomainError(f"{domain!r} is an address literal, not a domain")
    if name.isascii():
        return _check_alabel_name(name.lower())
    try:
        # UTS 46 §4: map (case, width, the ideographic full stop ...) first,
        # then encode label by label, so that an A-label among U-labels is
        # not decoded and judged again.
        mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)
        labels = [
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        ]
    except (idna.IDNAError, UnicodeError) as e:
        raise DomainError(f"{domain!r} is not a valid internationalised domain: {e}") from None
    return _check_alabel_name(".".join(labels).lower())


def _ulabel(label: str) -> str:
    """The U-label of an A-label IDNA 2008 can decode; any other label as is."""
    if not label.startswith("xn--"):
        return label
    try:
        return idna.ulabel(label)
    except (idna.IDNAError, UnicodeError):
        return label  # an A-label taken as written (see _check_alabel_name)


def to_unicode(domain: str) -> str:
    """
    Return the U-label form of a domain (for display, and as a cache key),
    lower case, no trailing dot.

    An A-label that IDNA 2008 cannot decode (C{xn--74h}: U+263A is not an
    IDNA 2008 code point) is kept as an A-label: the result is still one
    name per L{to_alabel} form.

    @raise DomainError: when the name is not a valid domain.
    """
    return ".".join(_ulabel(label) for label in to_alabel(domain).split("."))


# --- TXT records (RFC 8461 §3.1, RFC 8460 §3) ----------------------------------

_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}\Z")
# sts-ext-value / tlsrpt-ext-value: chars excluding "=", ";", SP and CTLs
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_WSP = " \t"
# RFC 3986 URI, generic syntax; RFC 8460 §3: ",", "!" and ";" must be encoded.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[A-Za-z0-9\-._~%:/?#\[\]@$&'()*+=]+\Z")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


@attrs.frozen
class STSRecord:
    """
    A parsed ``_mta-sts`` TXT record (RFC 8461 §3.1).

    @ivar id: the policy id (1–32 letters and digits).
    @ivar extensions: unknown fields as C{(name, value)} pairs, in order.
    """

    id: str
    extensions: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)


@attrs.frozen
class TLSRPTRecord:
    """
    A parsed ``_smtp._tls`` TXT record (RFC 8460 §3).

    @ivar rua: every reporting URI, in order (several C{rua} fields flattened).
    @ivar extensions: unknown fields as C{(name, value)} pairs, in order.
    """

    rua: tuple[str, ...] = attrs.field(converter=_strings)
    extensions: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)


def _split_fields(text: str, version: str, not_a_record: type[NotARecordError]) -> list[tuple[str, str]]:
    """
    Split a ``v=...; k=v; ...`` record into C{(key, value)} pairs.

    The version tag must come first, followed by ``*WSP ";"``; otherwise the
    string is some other kind of TXT record.
    """
    if not text.startswith(version) or not text[len(version):].lstrip(_WSP).startswith(";"):
        raise not_a_record(f"not a {version} record: {text[:80]!r}")
    parts = text[len(version):].split(";")[1:]
    if parts and parts[-1].strip(_WSP) == "":
        parts.pop()  # an optional trailing delimiter
    if not parts:
        raise RecordSyntaxError(f"no fields after {version}: {text[:80]!r}")
    fields = []
    for part in parts:
        field = part.strip(_WSP)
        if not field:
            raise RecordSyntaxError(f"empty field in {text[:80]!r}")
        key, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.match(key):
            raise RecordSyntaxError(f"malformed field {field[:40]!r} in {text[:80]!r}")
        fields.append((key, value))
    return fields


def _check_ext_value(key: str, value: str, text: str) -> None:
    if not _EXT_VALUE.match(value):
        raise RecordSyntaxError(f"invalid value for {key!r} in {text[:80]!r}")


def parse_sts_record(text: str) -> STSRecord:
    """
    Parse one ``_mta-sts`` TXT record (RFC 8461 §3.1).

    The first occurrence of a field counts; later ones are ignored whatever
    their value, as long as they are fields of the ABNF (RFC 8461 §3.2).

    @param text: the record's strings, already concatenated.
    @raise NotSTSRecordError: C{text} does not start with ``v=STSv1`` and ``;``.
    @raise RecordSyntaxError: a malformed STS record (e.g. no valid C{id}).
    """
    seen: dict[str, str] = {}
    extensions = []
    for key, value in _split_fields(text, "v=STSv1", NotSTSRecordError):
        if key in seen:
            # RFC 8461 §3.2: "If any non-repeated field ... is duplicated, all
            # entries except for the first SHALL be ignored."  Ruling: a later
            # duplicate is ignored whatever its value (``id=a; id=b-c`` is
            # id=a), but it must still be a field of the §3.1 ABNF: every
            # name, "id" too, matches sts-ext-name, so it must be an
            # sts-extension (a value of %x21-3A / %x3C / %x3E-7E).  A record
            # off the ABNF is syntactically invalid, and §3.1 says what then.
            _check_ext_value(key, value, text)
            continue
        if key == "id":
            if not _STS_ID.match(value):
                raise RecordSyntaxError(f"invalid id {value[:40]!r}: 1-32 letters and digits")
        else:
            _check_ext_value(key, value, text)
        seen[key] = value
        if key != "id":
            extensions.append((key, value))
    if "id" not in seen:
        raise RecordSyntaxError(f"STS record without id: {text[:80]!r}")
    return STSRecord(id=seen["id"], extensions=extensions)


def _parse_rua(value: str, text: str) -> list[str]:
    uris = [uri.strip(_WSP) for uri in value.split(",")]
    for uri in uris:
        if not _URI.match(uri) or _BAD_PERCENT.search(uri):
            raise RecordSyntaxError(f"invalid rua URI {uri[:60]!r} in {text[:80]!r}")
    return uris


def parse_tlsrpt_record(text: str) -> TLSRPTRecord:
    """
    Parse one ``_smtp._tls`` TXT record (RFC 8460 §3).

    Several C{rua} fields are all kept; other duplicate fields keep the first.

    @raise NotTLSRPTRecordError: C{text} does not start with ``v=TLSRPTv1`` and ``;``.
    @raise RecordSyntaxError: a malformed TLSRPT record (e.g. no valid C{rua}).
    """
    rua: list[str] = []
    seen: set[str] = set()
    extensions = []
    for key, value in _split_fields(text, "v=TLSRPTv1", NotTLSRPTRecordError):
        if key == "rua":
            rua.extend(_parse_rua(value, text))
            continue
        _check_ext_value(key, value, text)
        if key not in seen:
            seen.add(key)
            extensions.append((key, value))
    if not rua:
        raise RecordSyntaxError(f"TLSRPT record without rua: {text[:80]!r}")
    return TLSRPTRecord(rua=rua, extensions=extensions)


_Record = TypeVar("_Record", STSRecord, TLSRPTRecord)


def _select(
    txt_strings: Iterable[str],
    parse: Callable[[str], _Record],
    version: str,
    kind: str,
    multiple_reason: str,
) -> _Record:
    # RFC 8461 §3.1 (RFC 8460 §3 alike): "records that do not begin with
    # "v=STSv1;" are discarded.  If the number of resulting records is not
    # one, or if the resulting record is syntactically invalid, senders MUST
    # assume the recipient domain does not have an available MTA-STS Policy."
    # The ABNF allows WSP before the ";" (sts-field-delim = *WSP ";" *WSP),
    # so ``v=STSv1 ; id=b`` is a valid record, which the quoted rule would
    # discard.  Ruling: records beginning exactly ``v=STSv1;`` are counted
    # first; only when there is none do those with WSP before the ";" count.
    # So ["v=STSv1; id=a", "v=STSv1 ; id=b"] is id=a (not "multiple records",
    # which would fail open), and ``v=STSv1 ; id=b`` alone is still a record.
    exact: list[_Record | RecordSyntaxError] = []
    spaced: list[_Record | RecordSyntaxError] = []
    for text in txt_strings:
        candidate: _Record | RecordSyntaxError
        try:
            candidate = parse(text)
        except NotARecordError:
            continue  # RFC 8461 §3.1 / RFC 8460 §3: other TXT records are discarded
        except RecordSyntaxError as e:
            candidate = e
        (exact if text.startswith(version + ";") else spaced).append(candidate)
    candidates = exact or spaced
    if not candidates:
        raise NoRecordError(f"no {kind} record")
    if len(candidates) > 1:
        raise MultipleRecordsError(f"{len(candidates)} {kind} records", reason=multiple_reason)
    if isinstance(candidates[0], RecordSyntaxError):
        raise candidates[0]
    return candidates[0]


def select_sts_record(txt_strings: Iterable[str]) -> STSRecord:
    """
    Apply RFC 8461 §3.1 to the TXT strings of one ``_mta-sts`` lookup.

    Records that begin exactly ``v=STSv1;`` are counted first; those with
    white space before the ``;`` only when there is none of those (a ruling:
    see L{_select}).

    @param txt_strings: one text per RR, each RR's strings already concatenated.
    @raise NoRecordError: no string is an STS record.
    @raise MultipleRecordsError: more than one is (reason C{multiple-mta-sts-records}).
    @raise RecordSyntaxError: the one STS record is malformed.
    """
    return _select(txt_strings, parse_sts_record, "v=STSv1", "MTA-STS", "multiple-mta-sts-records")


def select_tlsrpt_record(txt_strings: Iterable[str]) -> TLSRPTRecord:
    """
    Apply RFC 8460 §3 to the TXT strings of one ``_smtp._tls`` lookup.

    As for L{select_sts_record}, records beginning exactly ``v=TLSRPTv1;``
    are counted first.

    @raise NoRecordError: no string is a TLSRPT record.
    @raise MultipleRecordsError: more than one is (reason C{multiple-tlsrpt-records}).
    @raise RecordSyntaxError: the one TLSRPT record is malformed.
    """
    return _select(txt_strings, parse_tlsrpt_record, "v=TLSRPTv1", "TLSRPT", "multiple-tlsrpt-records")


# --- policy text (RFC 8461 §3.2) ------------------------------------------------

_POLICY_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.\-]{0,31}):[ \t]*(.*?)[ \t]*\Z", re.S)
# sts-policy-ext-value: vchar [*(SP / vchar) vchar]; vchar includes UTF-8
_POLICY_EXT_VALUE = re.compile(r"[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?\Z")
_MAX_AGE = re.compile(r"[0-9]{1,10}\Z")
_KNOWN_FIELDS = ("version", "mode", "max_age", "mx")


def _mx_pattern(value: str) -> str:
    """Validate one ``mx`` value (RFC 8461 §3.2: ``["*."] Domain``); lower-case it."""
    if not value.isascii():
        raise PolicySyntaxError(f"mx {value!r}: must be written in A-labels, not U-labels")
    pattern = value.lower()
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if is_address_literal(name):
        raise PolicySyntaxError(f"mx {value!r}: address literals are not allowed")
    try:
        _check_alabel_name(name)
    except DomainError as e:
        raise PolicySyntaxError(f"mx {value!r}: {e}") from None
    return pattern


def _decode_policy(text: str | bytes) -> str:
    if isinstance(text, str):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise PolicySyntaxError("policy text is not valid Unicode") from None
    else:
        data = bytes(text)
    if len(data) > MAX_POLICY_SIZE:
        raise PolicySyntaxError(f"policy is {len(data)} bytes, over the {MAX_POLICY_SIZE}-byte limit")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicySyntaxError(f"policy is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    # Ruling: a leading UTF-8 BOM is ignored; rejecting it would fail open.
    return decoded[1:] if decoded.startswith("\ufeff") else decoded


#: Called with C{(line number or None, error)} for each error found in a
#: policy: L{parse_policy} raises the first, L{policy_errors} collects them.
_Report = Callable[[int | None, "PolicySyntaxError"], None]


def _raise(number: int | None, error: PolicySyntaxError) -> None:
    raise error


def _policy_lines(text: str, report: _Report = _raise) -> list[tuple[int, str]]:
    """The non-blank lines of a policy with their line numbers, CR of CRLF removed."""
    lines = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.endswith("\r"):
            line = line[:-1]  # RFC 8461 §3.2: sts-policy-term = LF / CRLF
        if "\r" in line:
            report(number, PolicySyntaxError(f"line {number}: bare CR (lines end in LF or CRLF)"))
            continue
        if line.strip(_WSP):  # ruling: blank lines are ignored
            lines.append((number, line))
    return lines


def parse_policy(text: str | bytes) -> Policy:
    """
    Parse an MTA-STS policy (RFC 8461 §3.2).

    The first occurrence of a field other than C{mx} counts; later ones are
    ignored whatever their value, as long as the line is a field at all.

    @param text: the body as received (bytes are decoded as UTF-8).
    @return: the L{Policy}, with C{.text} holding the decoded text.
    @raise PolicySyntaxError: the text is over 65536 bytes, not UTF-8, lacks a
        required field, or is anywhere else off the §3.2 grammar (the first
        such error; L{policy_errors} lists them all).
    """
    policy = _scan_policy(text, _raise)
    assert policy is not None, "_raise raised"
    return policy


def policy_errors(text: str | bytes) -> list[tuple[int | None, PolicySyntaxError]]:
    """
    Every error of an MTA-STS policy, where L{parse_policy} raises only the
    first (for C{mtasts-twisted check-policy}).

    After an error the scan goes on with the next line; a field whose value
    is wrong still counts as present (so it is not also reported missing).

    @param text: the body as received (bytes are decoded as UTF-8).
    @return: C{(line number or None, error)} pairs in the order of the text
        (errors of the whole policy, e.g. a missing field, last); empty
        when L{parse_policy} accepts the text.  The first error is the one
        L{parse_policy} raises.
    """
    errors: list[tuple[int | None, PolicySyntaxError]] = []
    _scan_policy(text, lambda number, error: errors.append((number, error)))
    return errors


def _scan_policy(text: str | bytes, report: _Report) -> Policy | None:
    """
    Check a policy, calling C{report} for each error (L{_raise} stops at the
    first); the L{Policy}, or L{None} when an error was reported.
    """
    try:
        decoded = _decode_policy(text)
    except PolicySyntaxError as e:
        report(None, e)
        return None
    errors = 0

    def error(number: int | None, message: str) -> None:
        nonlocal errors
        errors += 1
        report(number, PolicySyntaxError(message))

    def line_error(number: int | None, e: PolicySyntaxError) -> None:
        nonlocal errors
        errors += 1
        report(number, e)

    first: dict[str, str] = {}
    seen: set[str] = set()
    mx: list[str] = []
    extensions: list[tuple[str, str]] = []
    lines = _policy_lines(decoded, line_error)
    if not lines and not errors:
        error(None, "policy is empty")
        return None
    for number, line in lines:
        match = _POLICY_LINE.match(line)
        if match is None:
            error(number, f"line {number}: expected 'name: value', got {line[:60]!r}")
            continue
        key, value = match.groups()
        if not value:
            error(number, f"line {number}: empty value for {key!r}")
            seen.add(key)
            continue
        if key in seen and key != "mx":
            # RFC 8461 §3.2: "If any non-repeated field -- i.e., all fields
            # excepting "mx" -- is duplicated, all entries except for the
            # first SHALL be ignored."  Ruling: ignored whatever its value
            # (``mode: testing`` then ``mode: bogus`` is testing), but the
            # line must still be a field of the ABNF: every field name
            # matches sts-policy-ext-name, so it must at least be an
            # sts-policy-extension (a value without CTLs).
            if not _POLICY_EXT_VALUE.match(value):
                error(number, f"line {number}: {key!r} again, with control characters")
            continue
        seen.add(key)
        if key == "version":
            if value != "STSv1":
                error(number, f"version {value[:20]!r}: expected STSv1")
                continue
        elif key == "mode":
            if value not in ("enforce", "testing", "none"):
                error(number, f"mode {value[:20]!r}: expected enforce, testing or none")
                continue
        elif key == "max_age":
            if not _MAX_AGE.match(value):
                error(number, f"max_age {value[:20]!r}: expected 1 to 10 digits")
                continue
        elif key == "mx":
            try:
                mx.append(_mx_pattern(value))
            except PolicySyntaxError as e:
                line_error(number, e)
            continue
        elif not _POLICY_EXT_VALUE.match(value):
            error(number, f"extension {key!r}: value has control characters")
            continue
        first[key] = value
        if key not in _KNOWN_FIELDS:
            extensions.append((key, value))
    for required in ("version", "mode", "max_age"):
        if required not in seen:
            error(None, f"missing required field {required!r}")
    if "mode" in first and Mode(first["mode"]) is not Mode.NONE and not mx and "mx" not in seen:
        error(None, f"mode {first['mode']} requires at least one mx field")
    if errors:
        return None
    return Policy(
        mode=Mode(first["mode"]),
        max_age=min(int(first["max_age"]), MAX_MAX_AGE),  # ruling: clamp, don't reject
        mx=mx,
        extensions=extensions,
        text=decoded,
    )


@attrs.frozen
class Policy:
    """
    A parsed MTA-STS policy (RFC 8461 §3.2).

    @ivar mode: the L{Mode}.
    @ivar max_age: seconds the policy may be cached, clamped to 31557600.
    @ivar mx: the ``mx`` patterns as written (A-labels, lower case, ``*.`` kept).
    @ivar extensions: unknown fields as C{(name, value)} pairs.
    @ivar text: the policy text as received; not part of equality.
    """

    mode: Mode = attrs.field(converter=Mode)
    max_age: int
    mx: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    extensions: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_pairs)
    text: str = attrs.field(default="", eq=False, repr=False)

    def matches(self, host: str) -> bool:
        """
        Does MX host C{host} match one of the policy's ``mx`` patterns?

        RFC 8461 §4.1: case-insensitive, a trailing dot ignored, IDN hosts
        compared as A-labels, and ``*.`` matches exactly one leftmost label.
        """
        try:
            name = to_alabel(host)
        except DomainError:
            return False
        _, dot, parent = name.partition(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                if dot and parent == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False

    @property
    def policy_strings(self) -> tuple[str, ...]:
        """RFC 8460 §4.1 ``policy-string``: the policy's lines as received."""
        if self.text:
            return tuple(line for _, line in _policy_lines(self.text.lstrip("\ufeff")))
        return tuple(self.to_text().splitlines())

    def to_text(self) -> str:
        """Serialise to canonical policy text (CRLF line ends); parses back equal."""
        lines = ["version: STSv1", f"mode: {self.mode.value}"]
        lines += [f"mx: {pattern}" for pattern in self.mx]
        lines.append(f"max_age: {self.max_age}")
        lines += [f"{key}: {value}" for key, value in self.extensions]
        return "".join(line + "\r\n" for line in lines)
