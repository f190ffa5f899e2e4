"""
The outbound relay: an SMTP intake that queues mail durably, and delivery
workers that hand queued mail to a L{Deliverer
<mtasts_twisted.delivery.Deliverer>}, retry and send DSNs.

The rooms, bottom to top:

  - L{errors <mtasts_twisted.relay.errors>}: the queue's exceptions.
  - L{envelope <mtasts_twisted.relay.envelope>}: L{QueuedMessage} and
    L{RecipientState}, frozen values, and their JSON form on disk.
  - L{spool <mtasts_twisted.relay.spool>}: L{MessageWriter}, one message
    written and committed durably (the fsyncs), and the file helpers.
  - L{recent <mtasts_twisted.relay.recent>}: the bodies just committed,
    kept in memory (bounded) for their first delivery attempt.
  - L{recovery <mtasts_twisted.relay.recovery>}: one queue entry checked
    after a crash, and the quarantine.
  - L{queue <mtasts_twisted.relay.queue>}: the durable on-disk L{Queue}
    (layout, limits, listing, crash recovery).
  - L{settings <mtasts_twisted.relay.settings>}: L{RelaySettings}.
  - L{dsn <mtasts_twisted.relay.dsn>}: the bytes of a DSN (RFC 3464).
  - L{commands <mtasts_twisted.relay.commands>}: the intake's command
    arguments judged (RFC 5321 §4.1.2 addresses, RFC 6531 SMTPUTF8) and
    its C{Received:} line.
  - L{transaction <mtasts_twisted.relay.transaction>}: one MAIL
    transaction of the intake and the C{IMessage} that spools its data.
  - L{session <mtasts_twisted.relay.session>}: one SMTP connection of the
    intake: who may connect, the limits and timers, how lines are read.
  - L{intake <mtasts_twisted.relay.intake>}: the SMTP server side,
    L{RelaySMTPFactory} and its L{RelaySMTP} protocol (the commands).
  - L{timetable <mtasts_twisted.relay.timetable>}: L{Timetable}, when
    each queued message is due (the workers' in-memory schedule).
  - L{outcomes <mtasts_twisted.relay.outcomes>}: L{OutcomeRecorder}, what
    a delivery's outcome does (envelope updates, retries, expiry, DSNs).
  - L{workers <mtasts_twisted.relay.workers>}: L{RelayService}, the
    delivery loop (what to start now, within the limits; the periodic
    poll).

The operator's queue commands (C{mtasts-twisted queue list|show|retry|delete})
are L{mtasts_twisted.cli.queue}.
"""

from mtasts_twisted.relay.dsn import (
    DSN_KINDS,
    MAX_HEADER_BYTES,
    FailedRecipient,
    build_dsn,
    needs_dsn,
    read_headers,
    status_code_of,
)
from mtasts_twisted.relay.envelope import (
    ENVELOPE_VERSION,
    QueuedMessage,
    RecipientState,
    RecipientStatus,
)
from mtasts_twisted.relay.errors import (
    MessageTooLargeError,
    QueueError,
    QueueFullError,
    UnknownMessageError,
)
from mtasts_twisted.relay.intake import RelaySMTP, RelaySMTPFactory
from mtasts_twisted.relay.outcomes import DeliveryGroup, OutcomeRecorder
from mtasts_twisted.relay.queue import CHUNK_SIZE, Queue
from mtasts_twisted.relay.settings import LOOPBACK_NETWORKS, RelaySettings
from mtasts_twisted.relay.spool import BUFFERED_SIZE, MessageWriter
from mtasts_twisted.relay.timetable import Timetable
from mtasts_twisted.relay.workers import IDeliverer, RelayService

__all__ = [
    "BUFFERED_SIZE",
    "CHUNK_SIZE",
    "DSN_KINDS",
    "ENVELOPE_VERSION",
    "LOOPBACK_NETWORKS",
    "MAX_HEADER_BYTES",
    "DeliveryGroup",
    "FailedRecipient",
    "IDeliverer",
    "MessageTooLargeError",
    "MessageWriter",
    "OutcomeRecorder",
    "Queue",
    "QueueError",
    "QueueFullError",
    "QueuedMessage",
    "RecipientState",
    "RecipientStatus",
    "RelaySMTP",
    "RelaySMTPFactory",
    "RelayService",
    "RelaySettings",
    "Timetable",
    "UnknownMessageError",
    "build_dsn",
    "needs_dsn",
    "read_headers",
    "status_code_of",
]
