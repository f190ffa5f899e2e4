"""
The envelope of a queued message: L{QueuedMessage} and the
L{RecipientState} of each recipient, frozen values, and their JSON form
(C{<id>/envelope.json} in the queue directory, see
L{mtasts_twisted.relay.queue}).

An envelope is validated when it is read (L{decode_envelope}): types,
finite times within range, counts and sizes within bounds.  One that is
not valid raises, and the queue quarantines it like any corrupt file: a
C{NaN} time would otherwise break the ordering of the workers' schedule
and stall every delivery.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, NoReturn

import attrs

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_ADDRESS_LENGTH",
    "MAX_ATTEMPTS",
    "MAX_ENVELOPE_BYTES",
    "MAX_RECIPIENTS",
    "MAX_SIZE",
    "MAX_TEXT_LENGTH",
    "MAX_TIME",
    "QueuedMessage",
    "RecipientState",
    "RecipientStatus",
    "decode_envelope",
    "encode_envelope",
]

#: Envelope format version written into every envelope.
ENVELOPE_VERSION = 1

# Bounds checked when an envelope is read: far beyond anything the relay
# writes, so that only a damaged or hand-made envelope is refused.
#: The largest envelope file read, in octets.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
#: The most recipients of one message.
MAX_RECIPIENTS = 10_000
#: The longest address, in characters (the intake's longest command line).
MAX_ADDRESS_LENGTH = 8192
#: Longer texts (reasons, last error, MX host names) are cut to this length.
MAX_TEXT_LENGTH = 8192
#: The latest time, POSIX seconds (the year 5138); times are never negative.
MAX_TIME = 1e11
#: The largest message size, in octets.
MAX_SIZE = 2**53
#: The most delivery attempts counted.
MAX_ATTEMPTS = 1_000_000


class RecipientStatus(enum.Enum):
    """
    The delivery state of one recipient.

    @cvar PENDING: not delivered yet; will be tried (again).
    @cvar DELIVERED: accepted by the recipient's MX host.
    @cvar FAILED: given up (permanent failure or expired); the sender got a
        DSN unless the sender is null.
    """

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@attrs.frozen
class RecipientState:
    """
    One recipient of a queued message.

    @ivar address: the envelope recipient (RFC 5321 forward-path, no
        angle brackets).
    @ivar state: a L{RecipientStatus}.
    @ivar attempts: delivery attempts that ended in a transient failure.
    @ivar next_attempt: POSIX time before which it is not tried again.
    @ivar reason: the last outcome's text (server reply or our reason).
    @ivar status_code: the last outcome's RFC 3463 code, e.g. C{"4.4.1"}.
    @ivar remote_mta: the MX host that gave the last outcome.
    """

    address: str
    state: RecipientStatus = RecipientStatus.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    reason: str | None = None
    status_code: str | None = None
    remote_mta: str | None = None

    @property
    def domain(self) -> str:
        """The recipient's domain, lower-cased (empty without C{@})."""
        return self.address.rpartition("@")[2].lower()

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the envelope."""
        return {
            "address": self.address,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "reason": self.reason,
            "status_code": self.status_code,
            "remote_mta": self.remote_mta,
        }

    @classmethod
    def from_json(cls, data: Any) -> RecipientState:
        """Parse and validate the JSON form (raises C{KeyError}/C{ValueError}/C{TypeError})."""
        if not isinstance(data, dict):
            raise TypeError("recipient is not an object")
        return cls(
            address=_address(data["address"], "address"),
            state=RecipientStatus(data["state"]),
            attempts=_count(data.get("attempts", 0), "attempts", MAX_ATTEMPTS),
            next_attempt=_time(data.get("next_attempt", 0.0), "next_attempt"),
            reason=_opt_str(data.get("reason")),
            status_code=_opt_str(data.get("status_code")),
            remote_mta=_opt_str(data.get("remote_mta")),
        )


def _wrong_type(name: str, value: Any) -> NoReturn:
    raise TypeError(f"{name}: expected a number, got {type(value).__name__}")


def _time(value: Any, name: str) -> float:
    """A POSIX time: a finite number in [0, MAX_TIME]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _wrong_type(name, value)
    if not (math.isfinite(value) and 0 <= value <= MAX_TIME):
        raise ValueError(f"{name}: {value!r} is not a time")
    return float(value)


def _count(value: Any, name: str, limit: int) -> int:
    """A whole number in [0, limit]."""
    if isinstance(value, bool) or not isinstance(value, int):
        _wrong_type(name, value)
    if not 0 <= value <= limit:
        raise ValueError(f"{name}: {value} is out of range")
    return value


def _address(value: Any, name: str) -> str:
    """An envelope address (C{""} is the null sender)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"{name}: longer than {MAX_ADDRESS_LENGTH} characters")
    return value


def _opt_str(value: Any) -> str | None:
    """An optional text for display, cut to MAX_TEXT_LENGTH."""
    if value is None:
        return None
    if isinstance(value, str):
        return value[:MAX_TEXT_LENGTH]
    raise TypeError(f"expected a string, got {type(value).__name__}")


@attrs.frozen
class QueuedMessage:
    """
    A message in the queue: its envelope (the body is a separate file, see
    L{Queue.open_body}).

    @ivar id: the queue id (hex, sortable by time of arrival).
    @ivar sender: the envelope sender; C{""} is the null sender (RFC 5321
        §4.5.5: bounces and DSNs).
    @ivar recipients: a L{RecipientState} per recipient.
    @ivar created: POSIX time the message was accepted.
    @ivar size: the body's size in octets.
    @ivar attempts: delivery rounds made for this message.
    @ivar last_error: the last transient or permanent reason, for display.
    @ivar smtputf8: it was submitted with the C{SMTPUTF8} parameter (RFC
        6531 §3.4): its addresses or header fields may be UTF-8, and
        delivery asks the next server for SMTPUTF8 where it needs it.
        Envelopes written before this field read as C{False}.
    @ivar requiretls: it was submitted with the C{REQUIRETLS} parameter
        (RFC 8689 §4.1): delivery holds it to RFC 8689 §4.2.1, and its
        DSN carries the flag too (§5).  Envelopes written before this
        field read as C{False}.
    """

    id: str
    sender: str
    recipients: tuple[RecipientState, ...]
    created: float
    size: int
    attempts: int = 0
    last_error: str | None = None
    smtputf8: bool = False
    requiretls: bool = False

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        """The recipients still to be delivered."""
        return tuple(r for r in self.recipients if r.state is RecipientStatus.PENDING)

    @property
    def next_attempt(self) -> float | None:
        """The earliest C{next_attempt} of a pending recipient (L{None}: done)."""
        pending = self.pending
        return min(r.next_attempt for r in pending) if pending else None

    def recipient(self, address: str) -> RecipientState:
        """The state of recipient C{address}."""
        for state in self.recipients:
            if state.address == address:
                return state
        raise KeyError(address)

    def with_recipient(self, new: RecipientState) -> QueuedMessage:
        """A copy with recipient C{new.address} replaced by C{new}."""
        return attrs.evolve(
            self,
            recipients=tuple(
                new if r.address == new.address else r for r in self.recipients
            ),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored as the envelope."""
        return {
            "version": ENVELOPE_VERSION,
            "id": self.id,
            "sender": self.sender,
            "recipients": [r.to_json() for r in self.recipients],
            "created": self.created,
            "size": self.size,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "smtputf8": self.smtputf8,
            "requiretls": self.requiretls,
        }

    @classmethod
    def from_json(cls, data: Any) -> QueuedMessage:
        """Parse and validate an envelope (raises C{KeyError}/C{ValueError}/C{TypeError})."""
        if not isinstance(data, dict):
            raise TypeError("envelope is not an object")
        if data.get("version") != ENVELOPE_VERSION:
            raise ValueError(f"unknown envelope version {data.get('version')!r}")
        listed = data["recipients"]
        if not isinstance(listed, list):
            raise TypeError("recipients is not a list")
        if len(listed) > MAX_RECIPIENTS:
            raise ValueError(f"more than {MAX_RECIPIENTS} recipients")
        recipients = tuple(RecipientState.from_json(r) for r in listed)
        if not recipients:
            raise ValueError("no recipients")
        ident = data["id"]
        if not isinstance(ident, str) or len(ident) > 64:
            raise TypeError("id")
        smtputf8 = data.get("smtputf8", False)  # absent in older envelopes
        if not isinstance(smtputf8, bool):
            raise TypeError("smtputf8")
        requiretls = data.get("requiretls", False)  # absent in older envelopes
        if not isinstance(requiretls, bool):
            raise TypeError("requiretls")
        return cls(
            id=ident,
            sender=_address(data["sender"], "sender"),
            recipients=recipients,
            created=_time(data["created"], "created"),
            size=_count(data["size"], "size", MAX_SIZE),
            attempts=_count(data.get("attempts", 0), "attempts", MAX_ATTEMPTS),
            last_error=_opt_str(data.get("last_error")),
            smtputf8=smtputf8,
            requiretls=requiretls,
        )


def encode_envelope(message: QueuedMessage) -> bytes:
    """The bytes of C{message}'s envelope file (sorted, indented JSON)."""
    return json.dumps(message.to_json(), sort_keys=True, indent=1).encode("utf-8")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a number an envelope may hold")


def decode_envelope(data: bytes) -> QueuedMessage:
    """
    Parse and validate the bytes of an envelope file (see the module
    docstring).

    @raise ValueError: JSON that does not parse (C{NaN} and C{Infinity}
        included, or nested too deeply), an envelope over
        L{MAX_ENVELOPE_BYTES}, or a value out of range.
    @raise KeyError: a field is missing.
    @raise TypeError: a field has the wrong type.
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ValueError(f"envelope larger than {MAX_ENVELOPE_BYTES} octets")
    try:
        parsed = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("envelope nested too deeply") from None
    return QueuedMessage.from_json(parsed)
