"""
The relay's durable on-disk mail queue: L{Queue} (the directory, its
limits, the listing, crash recovery).  One message being written is a
L{MessageWriter} (L{mtasts_twisted.relay.spool}); its envelope is a
L{QueuedMessage} (L{mtasts_twisted.relay.envelope}).

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

import builtins
import io
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mtasts_twisted.relay.envelope import QueuedMessage, encode_envelope
from mtasts_twisted.relay.errors import QueueFullError, UnknownMessageError
from mtasts_twisted.relay.recent import RecentBodies
from mtasts_twisted.relay.recovery import ID_RE as _ID_RE
from mtasts_twisted.relay.recovery import check_entry, quarantine, read_envelope
from mtasts_twisted.relay.spool import (
    BODY_NAME,
    ENVELOPE_NAME,
    MessageWriter,
    delete_removed,
    fsync_dir,
    is_full,
    write_durably,
)

__all__ = ["CHUNK_SIZE", "Queue"]

log = Logger()

#: Bytes copied at a time when a message is given as a file.
CHUNK_SIZE = 64 * 1024



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
        clock: IReactorTime | None = None,
        threads: IReactorThreads | None = None,
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
        self._recent = RecentBodies()
        # Ids carry 32 random bits (unique across processes sharing the
        # directory); drawn from a pool, not a getrandom call per message.
        self._id_bits = b""
        self._sizes: dict[str, int] | None = None
        self._total = 0
        # The last full listing, kept up to date by this process's own
        # commits, updates and removals (see list(fresh=False)).
        self._known: dict[str, QueuedMessage] | None = None
        self._observers: builtins.list[Callable[[str, QueuedMessage | None], None]] = []
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

    def now(self) -> float:
        """The queue's clock: C{clock.seconds()}, or C{time.time()} without a clock."""
        return float(self._clock.seconds()) if self._clock is not None else time.time()

    def _new_id(self, now: float) -> str:
        if len(self._id_bits) < 4:
            self._id_bits = secrets.token_bytes(4096)
        bits, self._id_bits = self._id_bits[:4], self._id_bits[4:]
        return f"{int(now * 1_000_000):016x}-{bits.hex()}"

    def _path(self, ident: str) -> str:
        if not isinstance(ident, str) or not _ID_RE.match(ident):
            raise UnknownMessageError(ident)
        return os.path.join(self.directory, ident)

    def _index(self) -> dict[str, int]:
        if self._sizes is None:
            self._set_index(self.list())
        assert self._sizes is not None
        return self._sizes

    def _set_index(self, messages: builtins.list[QueuedMessage]) -> None:
        self._sizes = {m.id: m.size for m in messages}
        self._total = sum(self._sizes.values())  # kept up to date: O(1) checks

    def _committed(
        self,
        writer: MessageWriter,
        message: QueuedMessage,
        body: bytes | None = None,
        envelope_key: tuple[int, int, int] | None = None,
    ) -> None:
        self._writers.discard(writer)
        # Its first delivery attempt, a moment from now, reads neither file.
        if envelope_key is not None:
            self._cache[message.id] = (envelope_key, message)
        if body is not None:
            self._recent.put(message.id, body)
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
                while chunk := body.read(CHUNK_SIZE):
                    writer.write(chunk)
            else:
                for chunk in body:
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
        tmp = os.path.join(path, ENVELOPE_NAME + ".tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        try:
            write_durably(tmp, encode_envelope(message))
            os.rename(tmp, os.path.join(path, ENVELOPE_NAME))
            fsync_dir(path)
            if self._known is not None:
                self._known[message.id] = message
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if is_full(e):
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
            delete_removed(self.directory, gone)
        self._cache.pop(ident, None)
        self._recent.pop(ident)
        self._total -= self._index().pop(ident, 0)
        if self._known is not None:
            self._known.pop(ident, None)
        if threads is not None:
            deferToThreadPool(
                threads, threads.getThreadPool(), delete_removed, self.directory, gone
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
        path = os.path.join(self._path(ident), ENVELOPE_NAME)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UnknownMessageError(ident) from None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._cache.get(ident)
        if cached is not None and cached[0] == key:
            return cached[1]
        message = read_envelope(path)
        self._cache[ident] = (key, message)
        return message

    def open_body(self, ident: str) -> BinaryIO:
        """
        Open the message body for reading (a seekable binary file; the
        caller closes it).

        @raise UnknownMessageError: no such message.
        """
        path = self._path(ident)
        body = self._recent.get(ident)
        if body is not None:
            # Still queued?  Another process (queue delete) may have removed
            # it: answer as the file would.
            if not os.path.exists(os.path.join(path, ENVELOPE_NAME)):
                self._recent.pop(ident)
                raise UnknownMessageError(ident)
            return io.BytesIO(body)
        try:
            return open(os.path.join(path, BODY_NAME), "rb")
        except FileNotFoundError:
            raise UnknownMessageError(ident) from None

    def list(self, fresh: bool = True) -> builtins.list[QueuedMessage]:
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

    def _read_all(self) -> builtins.list[QueuedMessage]:
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

    def recover(self) -> builtins.list[QueuedMessage]:
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
            problem = check_entry(name, path)
            if problem is not None:
                quarantine(self.directory, name, problem)
                changed = True
        if changed:
            fsync_dir(self.directory)
        messages = self.list()
        self._set_index(messages)
        log.info("queue recovered: {count} message(s)", count=len(messages))
        return messages

    def quarantined(self) -> builtins.list[str]:
        """Names of the entries in C{quarantine/}."""
        try:
            return sorted(os.listdir(os.path.join(self.directory, "quarantine")))
        except FileNotFoundError:
            return []
