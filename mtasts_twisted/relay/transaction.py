"""
One MAIL transaction of the relay's intake (L{Transaction}): its sender,
recipients and SMTPUTF8 and REQUIRETLS flags, and the C{IMessage} (L{QueueMessage}) that
streams its data into the queue.  An error of the queue's files becomes a
reply here (L{spool_error}): C{452 4.3.1} for a full disk, C{451 4.3.0}
for any other (EIO, EROFS, EMFILE, ...), logged as one line; the session
goes on.
"""

from __future__ import annotations

import errno
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageSMTP
from twisted.mail.smtp import SMTPServerError
from zope.interface import implementer

from mtasts_twisted.relay.commands import MailCommand
from mtasts_twisted.relay.envelope import QueuedMessage
from mtasts_twisted.relay.errors import MessageTooLargeError, QueueFullError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.spool import MessageWriter, is_full

__all__ = ["LOCAL_ERROR", "NullMessage", "QueueMessage", "Transaction", "spool_error"]

log = Logger()


class _Holder(Protocol):
    """What a transaction needs of the intake's protocol."""

    def hold_input(self) -> None:
        """Hold pipelined input until the end of data is answered."""


#: The reply to a spool error other than a full disk (EIO, EROFS, EMFILE, ...).
LOCAL_ERROR = b"4.3.0 Local error in processing, try again later"


def spool_error(error: OSError, where: str) -> SMTPServerError:
    """
    The reply to C{error} of the queue's files: logged as one line (no
    traceback: the operator needs the errno, not our stack), and C{452
    4.3.1} for a full disk, C{451 4.3.0} for any other.

    @param where: what was being done (C{"writing"}, C{"committing"}, ...).
    """
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    log.error(  # grep: "cannot spool"
        "cannot spool a message ({where}): {errno} {error}", where=where, errno=name, error=str(error)
    )
    if is_full(error):
        return SMTPServerError(452, b"4.3.1 Insufficient system storage")
    return SMTPServerError(451, LOCAL_ERROR)


@implementer(IMessageSMTP)
class QueueMessage:
    """The one C{IMessage} of a transaction: streams lines into the queue."""

    def __init__(self, writer: MessageWriter, protocol: _Holder) -> None:
        """
        @param writer: the queue's writer of this message.
        @param protocol: the intake's protocol (it holds pipelined input
            while the dot is committed).
        """
        self._writer = writer
        self._protocol = protocol

    def lineReceived(self, line: bytes) -> None:
        """Write one line of data; a spool error becomes the reply to the dot."""
        try:
            self._writer.write(line + b"\r\n")
        except MessageTooLargeError:
            raise SMTPServerError(
                552, b"5.3.4 Message size exceeds fixed maximum message size"
            )
        except QueueFullError:
            raise SMTPServerError(452, b"4.3.1 Insufficient system storage")
        except OSError as e:
            # The writer removed what it wrote; twisted.mail reads and drops
            # the rest of the data and gives this reply to the final dot.
            raise spool_error(e, "writing") from None

    def eomReceived(self) -> Deferred[QueuedMessage]:
        """Commit the message: fires with it once durable."""
        # Failures are reported to the client by RelaySMTP._messageHandled.
        d = self._writer.commit_deferred()
        if not d.called:
            # Replies keep their order (RFC 2920 §3.1): pipelined commands
            # after this dot wait until it is answered.
            self._protocol.hold_input()
        return d

    def connectionLost(self) -> None:
        """The data ended badly: forget what was written."""
        self._writer.abort()


@implementer(IMessageSMTP)
class NullMessage:
    """The C{IMessage} of every other recipient: the first one stores all."""

    def lineReceived(self, line: bytes) -> None:
        """Ignore the line: the first recipient's message stores it."""

    def eomReceived(self) -> Deferred[None]:
        """Nothing to commit."""
        return succeed(None)

    def connectionLost(self) -> None:
        """Nothing to forget."""


class Transaction:
    """
    One MAIL transaction: its sender, accepted recipients and whether it
    has the SMTPUTF8 parameter (RFC 6531 §3.4) and the REQUIRETLS
    parameter (RFC 8689 §4.1).
    """

    def __init__(self, queue: Queue, protocol: _Holder, mail: MailCommand) -> None:
        """
        @param queue: where the message goes.
        @param protocol: the intake's protocol.
        @param mail: the accepted MAIL command.
        """
        self.queue = queue
        self.protocol = protocol
        self.sender = str(mail.sender) if mail.sender is not None else ""
        self.smtputf8 = mail.smtputf8
        self.requiretls = mail.requiretls
        self.recipients: list[str] = []
        self._made = False

    def message(self) -> IMessageSMTP:
        """
        The C{IMessage} of one recipient: twisted.mail calls this once per
        recipient at DATA; the first call opens the queue writer for all
        recipients, the others get a L{NullMessage}.
        """
        if self._made:
            return NullMessage()
        self._made = True
        try:
            writer = self.queue.begin(self.sender, self.recipients)
        except QueueFullError:
            raise SMTPServerError(452, b"4.3.1 Insufficient system storage")
        except OSError as e:
            raise spool_error(e, "starting") from None
        writer.smtputf8 = self.smtputf8
        writer.requiretls = self.requiretls  # RFC 8689 §4.1: tagged, kept with the message
        return QueueMessage(writer, self.protocol)
