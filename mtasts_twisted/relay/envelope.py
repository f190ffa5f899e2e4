"""
The envelope of a queued message: L{QueuedMessage} and the
L{RecipientState} of each recipient, frozen values, and their JSON form
(C{<id>/envelope.json} in the queue directory, see
L{mtasts_twisted.relay.queue}).
"""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs

__all__ = [
    "ENVELOPE_VERSION",
    "QueuedMessage",
    "RecipientState",
    "RecipientStatus",
    "decode_envelope",
    "encode_envelope",
]

#: Envelope format version written into every envelope.
ENVELOPE_VERSION = 1


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
    def from_json(cls, data: dict[str, Any]) -> RecipientState:
        """Parse the JSON form (raises C{KeyError}/C{ValueError}/C{TypeError})."""
        address = data["address"]
        if not isinstance(address, str):
            raise TypeError("address")
        return cls(
            address=address,
            state=RecipientStatus(data["state"]),
            attempts=int(data.get("attempts", 0)),
            next_attempt=float(data.get("next_attempt", 0.0)),
            reason=_opt_str(data.get("reason")),
            status_code=_opt_str(data.get("status_code")),
            remote_mta=_opt_str(data.get("remote_mta")),
        )


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
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
    """

    id: str
    sender: str
    recipients: tuple[RecipientState, ...]
    created: float
    size: int
    attempts: int = 0
    last_error: str | None = None
    smtputf8: bool = False

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
        }

    @classmethod
    def from_json(cls, data: Any) -> QueuedMessage:
        """Parse an envelope (raises C{KeyError}/C{ValueError}/C{TypeError})."""
        if not isinstance(data, dict):
            raise TypeError("envelope is not an object")
        if data.get("version") != ENVELOPE_VERSION:
            raise ValueError(f"unknown envelope version {data.get('version')!r}")
        recipients = tuple(RecipientState.from_json(r) for r in data["recipients"])
        if not recipients:
            raise ValueError("no recipients")
        sender = data["sender"]
        ident = data["id"]
        if not isinstance(sender, str) or not isinstance(ident, str):
            raise TypeError("id/sender")
        smtputf8 = data.get("smtputf8", False)  # absent in older envelopes
        if not isinstance(smtputf8, bool):
            raise TypeError("smtputf8")
        return cls(
            id=ident,
            sender=sender,
            recipients=recipients,
            created=float(data["created"]),
            size=int(data["size"]),
            attempts=int(data.get("attempts", 0)),
            last_error=_opt_str(data.get("last_error")),
            smtputf8=smtputf8,
        )


def encode_envelope(message: QueuedMessage) -> bytes:
    """The bytes of C{message}'s envelope file (sorted, indented JSON)."""
    return json.dumps(message.to_json(), sort_keys=True, indent=1).encode("utf-8")


def decode_envelope(data: bytes) -> QueuedMessage:
    """
    Parse the bytes of an envelope file (raises C{ValueError}, also for
    JSON that does not parse, C{KeyError} or C{TypeError}).
    """
    return QueuedMessage.from_json(json.loads(data))
