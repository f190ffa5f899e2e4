"""
Writing one message into the queue directory durably: L{MessageWriter}
(made by L{mtasts_twisted.relay.queue.Queue.begin}) receives the body (in
memory up to C{BUFFERED_SIZE}, else into C{tmp-<token>/}), then commits
it; and the file helpers (fsync a directory, write a file durably) it
shares with the queue.  What is fsynced when, and what runs in the thread
pool: see L{mtasts_twisted.relay.queue}.

Any C{OSError} on the way removes what was written; a full disk
(C{ENOSPC}, C{EDQUOT}) is raised as L{QueueFullError}, any other error
(C{EIO}, C{EROFS}, C{EMFILE}, ...) as itself: the intake answers
C{452 4.3.1} and C{451 4.3.0}.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import IO, NoReturn, Protocol, cast

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.relay.envelope import QueuedMessage, RecipientState, encode_envelope
from mtasts_twisted.relay.errors import MessageTooLargeError, QueueError, QueueFullError

__all__ = [
    "BODY_NAME",
    "BUFFERED_SIZE",
    "ENVELOPE_NAME",
    "MessageWriter",
    "WriterQueue",
]

log = Logger()

#: A message body up to this size is held in memory until its commit.
BUFFERED_SIZE = 64 * 1024
#: The body's file name in a message directory.
BODY_NAME = "message"
#: The envelope's file name in a message directory.
ENVELOPE_NAME = "envelope.json"

_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


def fsync_dir(path: str) -> None:
    """Make the entries of directory C{path} durable (fsync the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Write C{data} to a new file C{path}, flush and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def delete_removed(directory: str, gone: str) -> None:
    """
    Make the rename of a message to C{gone} (C{del-<id>/}) durable by
    fsyncing C{directory}, then delete its files.
    """
    fsync_dir(directory)
    shutil.rmtree(gone, ignore_errors=True)


def is_full(error: OSError) -> bool:
    """Whether C{error} says the disk (or the quota) is full."""
    return error.errno in _FULL_ERRNOS


class WriterQueue(Protocol):
    """
    What a L{MessageWriter} needs of its queue
    (L{mtasts_twisted.relay.queue.Queue}).

    @ivar directory: the queue directory (absolute).
    @ivar max_message_size: largest body accepted, in octets.
    """

    directory: str
    max_message_size: int
    #: The reactor whose thread pool runs the commit's file work, if any.
    _threads: IReactorThreads | None
    #: The writers not yet committed or aborted (they count against the limits).
    _writers: set[MessageWriter]

    def now(self) -> float:
        """The queue's clock: POSIX time."""

    def _new_id(self, now: float) -> str:
        """A new message id for a message accepted at C{now}."""

    def _check_room(self, size: int) -> None:
        """Raise L{QueueFullError} unless a message of C{size} octets fits."""

    def _committed(
        self,
        writer: MessageWriter,
        message: QueuedMessage,
        body: bytes | None = None,
        envelope_key: tuple[int, int, int] | None = None,
    ) -> None:
        """
        C{writer} made C{message} durable: count it and tell the observers.

        @param body: the body, when it was held in memory until the commit.
        @param envelope_key: C{(st_mtime_ns, st_size, st_ino)} of the
            envelope file written.
        """


class MessageWriter:
    """
    A message being received: write its body in chunks, then L{commit} it
    (or L{abort}).  Made by L{Queue.begin}.
    """

    def __init__(
        self, queue: WriterQueue, sender: str, recipients: tuple[str, ...], tmpdir: str
    ) -> None:
        self._queue = queue
        self._sender = sender
        self._recipients = recipients
        self._tmpdir = tmpdir
        #: Submitted with SMTPUTF8 (RFC 6531 §3.4): stored in the envelope.
        self.smtputf8 = False
        #: Submitted with REQUIRETLS (RFC 8689 §4.1): stored in the envelope.
        self.requiretls = False
        # A body up to BUFFERED_SIZE stays in memory until the commit, which
        # then writes it with the fsyncs (in a thread with commit_deferred):
        # no file system work per message on the reactor thread.  A larger
        # one goes to C{tmp-<token>/message} as it arrives.
        self._buffer = bytearray()
        self._file: IO[bytes] | None = None
        self.size = 0
        self._done = False
        self._committing = False
        self._renamed = False
        #: The body is all in C{_buffer} (no file written before the commit).
        self._in_memory = True
        self._envelope_key: tuple[int, int, int] | None = None

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the body.

        @raise MessageTooLargeError: the body went over the maximum size
            (the partial message is removed).
        @raise QueueFullError: the disk is full (the partial message is
            removed).
        """
        if self._done or self._committing:
            raise QueueError("message writer is closed")
        self.size += len(data)
        if self.size > self._queue.max_message_size:
            self.abort()
            raise MessageTooLargeError(
                f"message exceeds {self._queue.max_message_size} octets"
            )
        try:
            if self._file is None:
                self._buffer += data
                if len(self._buffer) <= BUFFERED_SIZE:
                    return
                self._create()
                self._in_memory = False
                data, self._buffer = bytes(self._buffer), bytearray()
            assert self._file is not None
            self._file.write(data)
        except OSError as e:
            self.abort()
            if is_full(e):
                raise QueueFullError(f"disk full: {e}") from e
            raise

    def _create(self) -> None:
        os.mkdir(self._tmpdir)
        self._file = open(os.path.join(self._tmpdir, BODY_NAME), "xb")  # noqa: SIM115 - closed in commit/abort

    def commit(self) -> QueuedMessage:
        """
        Make the message durable and part of the queue (see the module
        docstring); return it.

        @raise QueueFullError: the queue's limits or a full disk.
        """
        message = self._prepare()
        try:
            self._make_durable(message)
        except BaseException as e:  # noqa: BLE001 - _failed cleans up and re-raises it
            self._failed(e)
        return self._finish(message)

    def commit_deferred(self) -> Deferred[QueuedMessage]:
        """
        As L{commit}, with the file system work (the fsyncs and the rename)
        in the queue's thread pool when it has one (see L{Queue}), so the
        reactor goes on meanwhile.  The L{Deferred} fires once the message
        is as durable as after L{commit}; it fails as L{commit} raises.
        While it runs, L{abort} does nothing: the commit decides.
        """
        threads = self._queue._threads
        if threads is None:
            return maybeDeferred(self.commit)
        try:
            message = self._prepare()
        except BaseException:  # noqa: BLE001 - the caller gets it from the Deferred
            return fail()
        d = deferToThreadPool(threads, threads.getThreadPool(), self._make_durable, message)

        def failed(failure: Failure) -> QueuedMessage:
            self._failed(cast(BaseException, failure.value))
            raise AssertionError("unreachable")  # pragma: no cover

        return d.addCallbacks(lambda _: self._finish(message), failed)

    def _prepare(self) -> QueuedMessage:
        # In the reactor thread: limits, id and envelope.
        if self._done or self._committing:
            raise QueueError("message writer is closed")
        queue = self._queue
        try:
            queue._check_room(self.size)
        except BaseException:
            self.abort()
            raise
        self._committing = True
        now = queue.now()
        return QueuedMessage(
            id=queue._new_id(now),
            sender=self._sender,
            recipients=tuple(
                RecipientState(address=r, next_attempt=now) for r in self._recipients
            ),
            created=now,
            size=self.size,
            smtputf8=self.smtputf8,
            requiretls=self.requiretls,
        )

    def _make_durable(self, message: QueuedMessage) -> None:
        # Any one thread: touches only this writer's files, and the queue
        # directory by one rename and one fsync (module docstring).
        if self._file is None:
            self._create()
            assert self._file is not None
            self._file.write(self._buffer)
        f = self._file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        envelope = os.path.join(self._tmpdir, ENVELOPE_NAME)
        write_durably(envelope, encode_envelope(message))
        st = os.stat(envelope)
        # The queue's envelope cache key (a rename of the directory keeps it).
        self._envelope_key = (st.st_mtime_ns, st.st_size, st.st_ino)
        fsync_dir(self._tmpdir)
        os.rename(self._tmpdir, os.path.join(self._queue.directory, message.id))
        self._renamed = True  # the commit point
        fsync_dir(self._queue.directory)

    def _finish(self, message: QueuedMessage) -> QueuedMessage:
        self._committing = False
        self._done = True
        self._file = None
        body = bytes(self._buffer) if self._in_memory else None
        self._buffer = bytearray()
        self._queue._committed(self, message, body, self._envelope_key)
        log.info(
            "queued {id} from <{sender}> to {count} recipient(s), {size} octets",
            id=message.id,
            sender=message.sender,
            count=len(message.recipients),
            size=message.size,
        )
        return message

    def _failed(self, error: BaseException) -> NoReturn:
        self._committing = False
        if self._renamed:
            # In the queue but not known durable: no 250; a fresh listing
            # finds it (at worst a duplicate when the client sends again).
            self._done = True
            self._file = None
            self._queue._writers.discard(self)
        else:
            self.abort()
        if isinstance(error, OSError) and is_full(error):
            raise QueueFullError(f"disk full: {error}") from error
        raise error

    def abort(self) -> None:
        """
        Forget the message: close and remove what was written.  Idempotent;
        nothing while L{commit_deferred} runs.
        """
        if self._done or self._committing:
            return
        self._done = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self._buffer = bytearray()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._queue._writers.discard(self)
