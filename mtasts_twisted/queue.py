"""
The relay's durable on-disk mail queue.

Layout under the queue directory (e.g. C{<data-dir>/queue/})::

    <id>/message        the message, written once, never modified
    <id>/envelope.json  sender, recipients and their delivery state
    tmp-<token>/        a message being committed, or received when larger
                        than C{BUFFERED_SIZE} (not yet accepted)
    del-<id>/           a message being removed
    quarantine/         whatever L{Queue.recover} found broken

Durability (what is fsynced when):

  - L{Queue.enqueue} / L{MessageWriter.commit}: the body and the envelope
    are written in C{tmp-<token>/}, each C{flush}ed and C{os.fsync}ed, the
    temp directory is fsynced, renamed to C{<id>/} (the commit point: one
    atomic C{rename}), and the queue directory is fsynced.  Only then does
    the caller learn the message id (and the SMTP server answer 250).  A
    crash at any point leaves either a C{tmp-} directory (removed by
    L{Queue.recover}, the client got no 250) or a complete message.
  - L{Queue.update}: the new envelope is written to C{envelope.json.tmp},
    fsynced, renamed over C{envelope.json}, and the message directory is
    fsynced: a reader sees the old or the new envelope, never a mix.
  - L{Queue.remove}: C{<id>/} is renamed to C{del-<id>/} (atomic), the
    queue directory fsynced, then the files are deleted.

File I/O here is synchronous, in the caller's (the reactor's) thread: the
files are small or streamed in chunks, and the cost is the fsync latency
(milliseconds on local disks).  Except, given a C{threads} reactor (the
relay's): L{MessageWriter.commit_deferred}, which the SMTP intake uses,
runs the commit's file work (temp directory, body, envelope, four fsyncs,
the rename) in the reactor's thread pool, one thread per message, while
the reactor goes on; the queue's bookkeeping (limits, ids, the listing)
stays in the reactor thread, and the caller learns the id (the client
gets 250) only after the same fsyncs as L{MessageWriter.commit}.  And
L{Queue.remove} leaves its fsync and deletion to the pool (a power loss
right after can only bring a message back, never lose one).
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from typing import IO, Any, BinaryIO, NoReturn

import attrs
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "MessageTooLargeError",
    "MessageWriter",
    "Queue",
    "QueueError",
    "QueueFullError",
    "QueuedMessage",
    "RecipientState",
    "RecipientStatus",
    "UnknownMessageError",
    "queue_delete",
    "queue_list",
    "queue_retry",
    "queue_show",
]

log = Logger()

#: Bytes copied at a time when a message is given as a file.
CHUNK_SIZE = 64 * 1024
#: A message body up to this size is held in memory until its commit.
BUFFERED_SIZE = 64 * 1024
#: Envelope format version written into every envelope.
ENVELOPE_VERSION = 1

_BODY = "message"
_ENVELOPE = "envelope.json"
_ID_RE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}$")
_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class QueueError(Exception):
    """Base class of the queue's errors."""


class QueueFullError(QueueError):
    """
    The queue cannot take this message now: too many messages, too many
    bytes, or the disk is full (an SMTP server answers C{452 4.3.1},
    RFC 3463 "mail system full").
    """


class MessageTooLargeError(QueueError):
    """
    The message is larger than the queue's maximum message size (an SMTP
    server answers C{552 5.3.4}, RFC 3463, RFC 1870).
    """


class UnknownMessageError(QueueError, KeyError):
    """No message with this id is in the queue (or the id is malformed)."""


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
    """

    id: str
    sender: str
    recipients: tuple[RecipientState, ...]
    created: float
    size: int
    attempts: int = 0
    last_error: str | None = None

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
        return cls(
            id=ident,
            sender=sender,
            recipients=recipients,
            created=float(data["created"]),
            size=int(data["size"]),
            attempts=int(data.get("attempts", 0)),
            last_error=_opt_str(data.get("last_error")),
        )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, data: bytes) -> None:
    """Write C{data} to a new file C{path}, flush and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _delete_removed(directory: str, gone: str) -> None:
    # Make the rename to del-<id> durable, then delete the files.
    _fsync_dir(directory)
    shutil.rmtree(gone, ignore_errors=True)


def _is_full(error: OSError) -> bool:
    return error.errno in _FULL_ERRNOS


class MessageWriter:
    """
    A message being received: write its body in chunks, then L{commit} it
    (or L{abort}).  Made by L{Queue.begin}.
    """

    def __init__(
        self, queue: Queue, sender: str, recipients: tuple[str, ...], tmpdir: str
    ) -> None:
        self._queue = queue
        self._sender = sender
        self._recipients = recipients
        self._tmpdir = tmpdir
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
                data, self._buffer = bytes(self._buffer), bytearray()
            assert self._file is not None
            self._file.write(data)
        except OSError as e:
            self.abort()
            if _is_full(e):
                raise QueueFullError(f"disk full: {e}") from e
            raise

    def _create(self) -> None:
        os.mkdir(self._tmpdir)
        self._file = open(os.path.join(self._tmpdir, _BODY), "xb")  # noqa: SIM115 - closed in commit/abort

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
            self._failed(failure.value)
            raise AssertionError("unreachable")  # pragma: no cover

        d.addCallbacks(lambda _: self._finish(message), failed)
        return d

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
        now = queue._now()
        return QueuedMessage(
            id=queue._new_id(now),
            sender=self._sender,
            recipients=tuple(
                RecipientState(address=r, next_attempt=now) for r in self._recipients
            ),
            created=now,
            size=self.size,
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
        _write_durably(os.path.join(self._tmpdir, _ENVELOPE), _encode(message))
        _fsync_dir(self._tmpdir)
        os.rename(self._tmpdir, os.path.join(self._queue.directory, message.id))
        self._renamed = True  # the commit point
        _fsync_dir(self._queue.directory)

    def _finish(self, message: QueuedMessage) -> QueuedMessage:
        self._committing = False
        self._done = True
        self._file = None
        self._buffer = bytearray()
        self._queue._committed(self, message)
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
        if isinstance(error, OSError) and _is_full(error):
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


def _encode(message: QueuedMessage) -> bytes:
    return json.dumps(message.to_json(), sort_keys=True, indent=1).encode("utf-8")


class Queue:
    """
    The durable message queue in one directory (created if missing).

    @ivar directory: the queue directory.
    @ivar max_message_size: largest body accepted, in octets.
    @ivar max_messages: most messages queued at once (being received
        included).
    @ivar max_bytes: most body octets queued at once.
    """

    def __init__(
        self,
        directory: str,
        max_message_size: int = 25 * 1024 * 1024,
        max_messages: int = 10_000,
        max_bytes: int = 2 * 1024 * 1024 * 1024,
        clock: Any = None,
        threads: Any = None,
    ) -> None:
        """
        @param clock: has C{seconds()} (an C{IReactorTime}); C{time.time}
            when L{None}.
        @param threads: an C{IReactorThreads} (the reactor) whose thread
            pool runs the fsyncs of L{MessageWriter.commit_deferred};
            L{None}: they run in the caller's thread.
        """
        self.directory = os.path.abspath(directory)
        self.max_message_size = max_message_size
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._clock = clock
        self._threads = threads
        self._writers: set[MessageWriter] = set()
        self._cache: dict[str, tuple[tuple[int, int, int], QueuedMessage]] = {}
        self._sizes: dict[str, int] | None = None
        self._total = 0
        # The last full listing, kept up to date by this process's own
        # commits, updates and removals (see list(fresh=False)).
        self._known: dict[str, QueuedMessage] | None = None
        self._observers: list[Callable[[str, QueuedMessage | None], None]] = []
        os.makedirs(self.directory, exist_ok=True)

    def add_observer(self, observer: Callable[[str, QueuedMessage | None], None]) -> None:
        """
        Call C{observer(id, message)} after each commit and update made
        through this object, and C{observer(id, None)} after each removal.
        Changes made by other processes are not observed (only a fresh
        L{list} sees them).  The change is durable when it is called; an
        exception it raises is logged, never reported to the writer.
        """
        self._observers.append(observer)

    def _notify(self, ident: str, message: QueuedMessage | None) -> None:
        for observer in self._observers:
            try:
                observer(ident, message)
            except Exception:  # noqa: BLE001 - the change is durable; never fail the writer
                log.failure("queue observer failed on {id}", id=ident)

    # -- bookkeeping ----------------------------------------------------

    def _now(self) -> float:
        return float(self._clock.seconds()) if self._clock is not None else time.time()

    def _new_id(self, now: float) -> str:
        return f"{int(now * 1_000_000):016x}-{secrets.token_hex(4)}"

    def _path(self, ident: str) -> str:
        if not isinstance(ident, str) or not _ID_RE.match(ident):
            raise UnknownMessageError(ident)
        return os.path.join(self.directory, ident)

    def _index(self) -> dict[str, int]:
        if self._sizes is None:
            self._set_index(self.list())
        assert self._sizes is not None
        return self._sizes

    def _set_index(self, messages: list[QueuedMessage]) -> None:
        self._sizes = {m.id: m.size for m in messages}
        self._total = sum(self._sizes.values())  # kept up to date: O(1) checks

    def _committed(self, writer: MessageWriter, message: QueuedMessage) -> None:
        self._writers.discard(writer)
        sizes = self._index()
        self._total += message.size - sizes.get(message.id, 0)
        sizes[message.id] = message.size
        if self._known is not None:
            self._known[message.id] = message
        self._notify(message.id, message)

    def _check_room(self, size: int) -> None:
        sizes = self._index()
        if len(sizes) >= self.max_messages:
            raise QueueFullError(
                f"queue holds {len(sizes)} messages (limit {self.max_messages})"
            )
        if self._total + size > self.max_bytes:
            raise QueueFullError(f"queue would exceed {self.max_bytes} octets")

    @property
    def count(self) -> int:
        """Messages in the queue."""
        return len(self._index())

    @property
    def total_bytes(self) -> int:
        """Body octets in the queue."""
        self._index()
        return self._total

    def has_room(self) -> bool:
        """Whether a new (small) message would be taken now."""
        sizes = self._index()
        return (
            len(sizes) + len(self._writers) < self.max_messages
            and self._total < self.max_bytes
        )

    # -- writing --------------------------------------------------------

    def begin(self, sender: str, recipients: Iterable[str]) -> MessageWriter:
        """
        Start receiving a message; write its body with the returned
        L{MessageWriter}.

        @raise QueueFullError: the queue is at its message count or byte
            limit, or the disk is full.
        """
        recipients = tuple(recipients)
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        sizes = self._index()
        if len(sizes) + len(self._writers) >= self.max_messages:
            raise QueueFullError(
                f"queue holds {len(sizes)} messages (limit {self.max_messages})"
            )
        if self._total >= self.max_bytes:
            raise QueueFullError(f"queue holds {self.max_bytes} octets or more")
        tmpdir = os.path.join(self.directory, "tmp-" + secrets.token_hex(8))
        writer = MessageWriter(self, sender, recipients, tmpdir)
        self._writers.add(writer)
        return writer

    def enqueue(
        self,
        sender: str,
        recipients: Iterable[str],
        body: bytes | BinaryIO | Iterable[bytes],
    ) -> QueuedMessage:
        """
        Add a message; return it once it is durable.

        @param body: the message as bytes, a binary file (read in chunks) or
            an iterable of byte chunks.  It is streamed to disk, never held
            whole in memory here.
        @raise QueueFullError: limits or a full disk (nothing is left behind).
        @raise MessageTooLargeError: over C{max_message_size}.
        """
        writer = self.begin(sender, recipients)
        try:
            if isinstance(body, bytes):
                writer.write(body)
            elif hasattr(body, "read"):
                while chunk := body.read(CHUNK_SIZE):  # type: ignore[union-attr]
                    writer.write(chunk)
            else:
                for chunk in body:  # type: ignore[union-attr]
                    writer.write(chunk)
            return writer.commit()
        finally:
            writer.abort()

    def update(self, message: QueuedMessage) -> None:
        """
        Atomically replace a message's envelope (write, fsync, rename,
        fsync the directory).  The body is never touched.

        @raise UnknownMessageError: no such message.
        """
        path = self._path(message.id)
        if not os.path.isdir(path):
            raise UnknownMessageError(message.id)
        tmp = os.path.join(path, _ENVELOPE + ".tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        try:
            _write_durably(tmp, _encode(message))
            os.rename(tmp, os.path.join(path, _ENVELOPE))
            _fsync_dir(path)
            if self._known is not None:
                self._known[message.id] = message
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if _is_full(e):
                raise QueueFullError(f"disk full: {e}") from e
            raise
        self._notify(message.id, message)

    def remove(self, ident: str) -> None:
        """
        Remove a message (atomically: rename away, fsync, then delete).
        With C{threads} (see L{Queue}), the fsync and the deletion run in
        the thread pool after this returns: the rename is the removal, and
        should a power loss undo it before the fsync, the message is only
        delivered again, never lost (L{recover} deletes a leftover
        C{del-} directory).

        @raise UnknownMessageError: no such message.
        """
        path = self._path(ident)
        gone = os.path.join(self.directory, "del-" + ident)
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            raise UnknownMessageError(ident) from None
        threads = self._threads
        if threads is None:
            _delete_removed(self.directory, gone)
        self._cache.pop(ident, None)
        self._total -= self._index().pop(ident, 0)
        if self._known is not None:
            self._known.pop(ident, None)
        if threads is not None:
            deferToThreadPool(
                threads, threads.getThreadPool(), _delete_removed, self.directory, gone
            ).addErrback(
                lambda f: log.failure("deleting removed {id} failed", f, id=ident)
            )
        self._notify(ident, None)

    # -- reading --------------------------------------------------------

    def get(self, ident: str) -> QueuedMessage:
        """
        The message with id C{ident}, read from its envelope.

        @raise UnknownMessageError: no such message, or a malformed id.
        """
        path = os.path.join(self._path(ident), _ENVELOPE)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UnknownMessageError(ident) from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(ident)
        if cached is not None and cached[0] == key:
            return cached[1]
        with open(path, "rb") as f:
            message = QueuedMessage.from_json(json.loads(f.read()))
        self._cache[ident] = (key, message)
        return message

    def open_body(self, ident: str) -> BinaryIO:
        """
        Open the message body for reading (a seekable binary file; the
        caller closes it).

        @raise UnknownMessageError: no such message.
        """
        try:
            return open(os.path.join(self._path(ident), _BODY), "rb")
        except FileNotFoundError:
            raise UnknownMessageError(ident) from None

    def list(self, fresh: bool = True) -> list[QueuedMessage]:
        """
        The queued messages, oldest first.  Envelopes that do not parse are
        skipped here (logged); L{recover} quarantines them.

        @param fresh: read the directory (C{True}); or, when C{False}, answer
            from the last full listing as changed since by this object's own
            commits, updates and removals — without seeing changes made by
            other processes (C{mtasts-twisted queue retry/delete}) until the
            next fresh listing.  The relay uses it between its periodic polls,
            so that a large backlog is not re-read for every message.
        """
        if not fresh and self._known is not None:
            return [self._known[ident] for ident in sorted(self._known)]
        messages = self._read_all()
        self._known = {m.id: m for m in messages}
        return messages

    def _read_all(self) -> list[QueuedMessage]:
        messages = []
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        for name in names:
            if not _ID_RE.match(name):
                continue
            try:
                messages.append(self.get(name))
            except UnknownMessageError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                    "cannot read queue envelope {id}: {error}", id=name, error=str(e)
                )
        return messages

    # -- startup --------------------------------------------------------

    def recover(self) -> list[QueuedMessage]:
        """
        Clean up after a crash; call once at startup, before anything else.

        Removes C{tmp-*} (never accepted) and C{del-*} (being removed)
        directories and leftover C{envelope.json.tmp} files; moves to
        C{quarantine/} (with an error log line, never silently dropped)
        anything else that is not a complete message: an envelope that
        does not parse, a body without an envelope or the reverse, a body
        whose size differs from its envelope's, unknown files.

        @return: the messages in the queue, oldest first.
        """
        changed = False
        self._cache.clear()
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name == "quarantine":
                continue
            if name.startswith(("tmp-", "del-")):
                log.info("recover: removing unfinished {name}", name=name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
                changed = True
                continue
            problem = self._check(name, path)
            if problem is not None:
                self._quarantine(name, problem)
                changed = True
        if changed:
            _fsync_dir(self.directory)
        messages = self.list()
        self._set_index(messages)
        log.info("queue recovered: {count} message(s)", count=len(messages))
        return messages

    def _check(self, name: str, path: str) -> str | None:
        if not _ID_RE.match(name) or os.path.islink(path) or not os.path.isdir(path):
            return "not a queue entry"
        tmp = os.path.join(path, _ENVELOPE + ".tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
            _fsync_dir(path)
        extra = set(os.listdir(path)) - {_BODY, _ENVELOPE}
        if extra:
            return f"unexpected files {sorted(extra)}"
        body = os.path.join(path, _BODY)
        envelope = os.path.join(path, _ENVELOPE)
        if not os.path.isfile(envelope):
            return "body without envelope"
        if not os.path.isfile(body):
            return "envelope without body"
        try:
            with open(envelope, "rb") as f:
                message = QueuedMessage.from_json(json.loads(f.read()))
        except (ValueError, KeyError, TypeError) as e:
            return f"envelope does not parse: {e}"
        if message.id != name:
            return f"envelope id {message.id!r} differs from its directory"
        size = os.path.getsize(body)
        if size != message.size:
            return f"body has {size} octets, envelope says {message.size}"
        return None

    def _quarantine(self, name: str, problem: str) -> None:
        qdir = os.path.join(self.directory, "quarantine")
        os.makedirs(qdir, exist_ok=True)
        target = os.path.join(qdir, f"{name}.{int(time.time())}.{secrets.token_hex(2)}")
        os.rename(os.path.join(self.directory, name), target)
        _fsync_dir(qdir)
        log.error(
            "queue entry {name} quarantined to {target}: {problem}",
            name=name,
            target=target,
            problem=problem,
        )

    def quarantined(self) -> list[str]:
        """Names of the entries in C{quarantine/}."""
        try:
            return sorted(os.listdir(os.path.join(self.directory, "quarantine")))
        except FileNotFoundError:
            return []


# -- operations for the CLI ------------------------------------------------


def _summary(message: QueuedMessage, now: float) -> dict[str, Any]:
    return {
        "id": message.id,
        "sender": message.sender,
        "recipients": [r.address for r in message.recipients],
        "pending": [r.address for r in message.pending],
        "size": message.size,
        "created": message.created,
        "age": max(0.0, now - message.created),
        "attempts": message.attempts,
        "next_attempt": message.next_attempt,
        "last_error": message.last_error,
    }


def queue_list(queue: Queue) -> list[dict[str, Any]]:
    """
    One summary dict per queued message, oldest first (C{id}, C{sender},
    C{recipients}, C{pending}, C{size}, C{created}, C{age}, C{attempts},
    C{next_attempt}, C{last_error}).
    """
    now = queue._now()
    return [_summary(m, now) for m in queue.list()]


def queue_show(queue: Queue, ident: str) -> dict[str, Any]:
    """
    The full envelope of one message, as JSON-able dict (the summary plus
    per-recipient C{recipients_state}).

    @raise UnknownMessageError: no such message.
    """
    message = queue.get(ident)
    data = _summary(message, queue._now())
    data["recipients_state"] = [r.to_json() for r in message.recipients]
    return data


def queue_retry(queue: Queue, ident: str) -> QueuedMessage:
    """
    Make every pending recipient of a message due now.  A running relay
    picks it up at its next poll (if that message is in flight, the relay's
    own envelope update may win: retry again).

    @raise UnknownMessageError: no such message.
    """
    message = queue.get(ident)
    now = queue._now()
    for r in message.pending:
        message = message.with_recipient(attrs.evolve(r, next_attempt=now))
    queue.update(message)
    log.info("retry of {id} requested", id=ident)
    return message


def queue_delete(queue: Queue, ident: str) -> None:
    """
    Remove a message without delivering it and without a DSN.

    @raise UnknownMessageError: no such message.
    """
    queue.remove(ident)
