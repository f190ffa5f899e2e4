"""
Tests for L{mtasts_twisted.queue}: durability layout, crash recovery,
quarantine, limits, disk full and streaming.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
import tracemalloc
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.cli.queue import queue_delete, queue_list, queue_retry, queue_show
from mtasts_twisted.relay import (
    MessageTooLargeError,
    Queue,
    QueuedMessage,
    QueueError,
    QueueFullError,
    RecipientStatus,
    UnknownMessageError,
)

BODY = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nHi.\r\n"


class QueueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-queue-")
        self.addCleanup(
            lambda: __import__("shutil").rmtree(self.dir, ignore_errors=True)
        )
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.queue = Queue(self.dir, clock=self.clock)

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.dir))

    def test_list_not_fresh(self) -> None:
        """list(fresh=False) follows this queue's own writes without reading
        the directory; another process's changes appear on a fresh listing."""
        first = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        self.assertEqual(self.queue.list(), [first])
        self.clock.advance(1)  # ids of one instant order by their random part
        second = self.queue.enqueue("a@example.org", ["c@example.com"], BODY)
        updated = attrs.evolve(first, attempts=3)
        self.queue.update(updated)
        no_listing = self.patch(os, "listdir", lambda path: self.fail("read the directory"))
        self.assertEqual(self.queue.list(fresh=False), [updated, second])
        self.queue.remove(second.id)
        self.assertEqual(self.queue.list(fresh=False), [updated])
        no_listing.restore()
        Queue(self.dir).remove(updated.id)  # as `mtasts-twisted queue delete` would
        self.assertEqual(self.queue.list(fresh=False), [updated])
        self.assertEqual(self.queue.list(), [])

    def test_enqueue_layout_and_read_back(self) -> None:
        m = self.queue.enqueue(
            "a@example.org", ["b@example.com", "c@example.net"], BODY
        )
        self.assertEqual(self.entries(), [m.id])
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.dir, m.id))),
            ["envelope.json", "message"],
        )
        self.assertEqual(m.created, 1_700_000_000)
        self.assertEqual(m.size, len(BODY))
        self.assertEqual([r.state for r in m.recipients], [RecipientStatus.PENDING] * 2)
        self.assertEqual(self.queue.get(m.id), m)
        with self.queue.open_body(m.id) as f:
            self.assertEqual(f.read(), BODY)
        self.assertEqual(self.queue.list(), [m])
        self.assertEqual(Queue(self.dir).recover(), [m])

    def test_enqueue_file_and_chunks(self) -> None:
        a = self.queue.enqueue("", ["b@example.com"], io.BytesIO(BODY))
        b = self.queue.enqueue("", ["b@example.com"], iter([BODY[:5], BODY[5:]]))
        for m in (a, b):
            with self.queue.open_body(m.id) as f:
                self.assertEqual(f.read(), BODY)

    def test_update_is_atomic_rewrite(self) -> None:
        m = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        r = m.recipients[0]
        new = attrs.evolve(
            m.with_recipient(attrs.evolve(r, state=RecipientStatus.DELIVERED)),
            attempts=1,
        )
        self.queue.update(new)
        self.assertEqual(Queue(self.dir).get(m.id), new)
        self.assertEqual(
            os.listdir(os.path.join(self.dir, m.id)).count("envelope.json.tmp"), 0
        )

    def test_fsync_before_rename(self) -> None:
        """The body, envelope and directories are fsynced before the commit rename."""
        calls: list[str] = []
        real_fsync, real_rename = os.fsync, os.rename
        self.patch(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
        self.patch(
            os, "rename", lambda a, b: (calls.append("rename"), real_rename(a, b))[1]
        )
        self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        # body, envelope, tmp dir, then rename, then the queue directory.
        self.assertEqual(calls, ["fsync", "fsync", "fsync", "rename", "fsync"])

    def test_recover_after_crash_mid_enqueue(self) -> None:
        """A crash before the commit rename leaves a tmp- dir: removed, no message."""
        good = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        writer = self.queue.begin("a@example.org", ["b@example.com"])
        writer.write(b"half a mess")
        # simulate kill -9: the writer is never committed or aborted
        os.mkdir(os.path.join(self.dir, "del-" + good.id[:-1] + "0"))
        fresh = Queue(self.dir, clock=self.clock)
        self.assertEqual(fresh.recover(), [good])
        self.assertEqual(self.entries(), [good.id])
        self.assertEqual(fresh.quarantined(), [])

    def test_recover_half_written_envelope_update(self) -> None:
        """A crash during update leaves envelope.json.tmp: dropped, old envelope kept."""
        m = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        with open(os.path.join(self.dir, m.id, "envelope.json.tmp"), "wb") as f:
            f.write(b'{"version": 1, "id": "trunc')
        self.assertEqual(Queue(self.dir).recover(), [m])
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.dir, m.id))),
            ["envelope.json", "message"],
        )

    def test_quarantine_corrupt_entries(self) -> None:
        """Nothing broken is dropped silently: it goes to quarantine/ with a log line."""
        good = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        bad_env = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        no_env = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        no_body = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        short = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        with open(os.path.join(self.dir, bad_env.id, "envelope.json"), "wb") as f:
            f.write(b"{not json")
        os.unlink(os.path.join(self.dir, no_env.id, "envelope.json"))
        os.unlink(os.path.join(self.dir, no_body.id, "message"))
        with open(os.path.join(self.dir, short.id, "message"), "wb") as f:
            f.write(b"trunc")
        with open(os.path.join(self.dir, "stray-file"), "wb") as f:
            f.write(b"?")
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(Queue(self.dir).recover(), [good])
        quarantined = Queue(self.dir).quarantined()
        self.assertEqual(len(quarantined), 5)
        for ident in (bad_env.id, no_env.id, no_body.id, short.id):
            self.assertTrue(any(q.startswith(ident) for q in quarantined))
        problems = [e["problem"] for e in events if "problem" in e]
        self.assertEqual(len(problems), 5)
        self.assertTrue(any("body without envelope" in p for p in problems))
        self.assertTrue(any("envelope without body" in p for p in problems))
        self.assertTrue(any("does not parse" in p for p in problems))

    def test_message_too_large(self) -> None:
        q = Queue(self.dir, max_message_size=10)
        self.assertRaises(
            MessageTooLargeError, q.enqueue, "", ["b@example.com"], b"x" * 11
        )
        self.assertEqual(self.entries(), [])
        q.enqueue("", ["b@example.com"], b"x" * 10)

    def test_queue_count_limit(self) -> None:
        q = Queue(self.dir, max_messages=2)
        q.enqueue("", ["b@example.com"], BODY)
        w = q.begin("", ["b@example.com"])  # in progress counts
        self.assertFalse(q.has_room())
        self.assertRaises(QueueFullError, q.enqueue, "", ["b@example.com"], BODY)
        w.abort()
        m = q.enqueue("", ["b@example.com"], BODY)
        self.assertRaises(QueueFullError, q.enqueue, "", ["b@example.com"], BODY)
        q.remove(m.id)
        q.enqueue("", ["b@example.com"], BODY)
        self.assertEqual(len(self.entries()), 2)

    def test_queue_bytes_limit(self) -> None:
        q = Queue(self.dir, max_bytes=100)
        q.enqueue("", ["b@example.com"], b"x" * 60)
        self.assertRaises(QueueFullError, q.enqueue, "", ["b@example.com"], b"x" * 41)
        self.assertEqual(len(self.entries()), 1)
        self.assertEqual(q.total_bytes, 60)

    def test_disk_full_while_writing(self) -> None:
        """ENOSPC → QueueFullError and the partial message is removed."""
        real_open = open

        def full_open(path: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
            f = real_open(path, mode, *a, **kw)
            if "x" in mode and str(path).endswith("message"):

                class Wrapper:
                    def __init__(self, inner: Any) -> None:
                        self.inner = inner

                    def write(self, data: bytes) -> int:
                        raise OSError(errno.ENOSPC, "No space left on device")

                    def __getattr__(self, name: str) -> Any:
                        return getattr(self.inner, name)

                return Wrapper(f)
            return f

        import builtins

        self.patch(builtins, "open", full_open)
        self.assertRaises(
            QueueFullError, self.queue.enqueue, "", ["b@example.com"], BODY
        )
        self.assertEqual(self.entries(), [])

    def test_disk_full_at_fsync(self) -> None:
        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "fsync", no_space)
        self.assertRaises(
            QueueFullError, self.queue.enqueue, "", ["b@example.com"], BODY
        )
        self.assertEqual(self.entries(), [])

    def test_stream_20_mb(self) -> None:
        """A 20 MB message goes to disk in chunks, never whole in memory."""
        chunk = b"x" * 998 + b"\r\n"
        count = 20 * 1024 * 1024 // len(chunk)
        tracemalloc.start()
        try:
            m = self.queue.enqueue("", ["b@example.com"], (chunk for _ in range(count)))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(m.size, count * len(chunk))
        self.assertLess(peak, 2 * 1024 * 1024)
        self.assertEqual(
            os.path.getsize(os.path.join(self.dir, m.id, "message")), m.size
        )

    def test_remove_and_unknown(self) -> None:
        m = self.queue.enqueue("", ["b@example.com"], BODY)
        self.queue.remove(m.id)
        self.assertEqual(self.entries(), [])
        self.assertRaises(UnknownMessageError, self.queue.get, m.id)
        self.assertRaises(UnknownMessageError, self.queue.remove, m.id)
        self.assertRaises(UnknownMessageError, self.queue.get, "../etc")
        self.assertRaises(UnknownMessageError, self.queue.open_body, "../../x")

    def test_cli_operations(self) -> None:
        m = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        r = attrs.evolve(
            m.recipients[0], next_attempt=1_700_009_999, attempts=3, reason="421 busy"
        )
        self.queue.update(m.with_recipient(r))
        [summary] = queue_list(self.queue)
        self.assertEqual(summary["id"], m.id)
        self.assertEqual(summary["next_attempt"], 1_700_009_999)
        shown = queue_show(self.queue, m.id)
        self.assertEqual(shown["recipients_state"][0]["reason"], "421 busy")
        json.dumps(shown)
        self.clock.advance(10)
        queue_retry(self.queue, m.id)
        self.assertEqual(self.queue.get(m.id).next_attempt, 1_700_000_010)
        queue_delete(self.queue, m.id)
        self.assertEqual(queue_list(self.queue), [])
        self.assertRaises(UnknownMessageError, queue_show, self.queue, m.id)

    def test_envelope_round_trip(self) -> None:
        m = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        self.assertEqual(
            QueuedMessage.from_json(json.loads(json.dumps(m.to_json()))), m
        )
        self.assertRaises(
            ValueError, QueuedMessage.from_json, {**m.to_json(), "version": 99}
        )


class _Pool:
    """A thread pool whose work runs when the test says (in this thread)."""

    def __init__(self) -> None:
        self.work: list[Any] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        self.work.append((on_result, f, args, kw))

    def run(self) -> None:
        work, self.work = self.work, []
        for on_result, f, args, kw in work:
            try:
                result = f(*args, **kw)
            except BaseException:  # noqa: BLE001 - handed on as a Failure, as a pool does
                from twisted.python.failure import Failure

                on_result(False, Failure())
            else:
                on_result(True, result)


class _Threads:
    """An C{IReactorThreads} enough for C{deferToThreadPool}."""

    def __init__(self) -> None:
        self.pool = _Pool()

    def getThreadPool(self) -> _Pool:
        return self.pool

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class CommitInThreadTests(SynchronousTestCase):
    """L{MessageWriter.commit_deferred} with the fsyncs in a thread pool."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-queue-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, ignore_errors=True))
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.threads = _Threads()
        self.queue = Queue(self.dir, clock=self.clock, threads=self.threads)
        self.seen: list[Any] = []
        self.queue.add_observer(lambda ident, m: self.seen.append((ident, m)))

    def test_fires_after_fsyncs(self) -> None:
        """
        Nothing is durable, known or reported before the pool ran the work;
        then the Deferred fires with the message, after every fsync, and
        the abort of a lost connection meanwhile changes nothing.
        """
        synced: list[str] = []
        real_fsync = os.fsync
        self.patch(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
        writer = self.queue.begin("a@example.org", ["b@example.com"])
        writer.write(BODY)
        d = writer.commit_deferred()
        self.assertNoResult(d)
        self.assertEqual(synced, [])
        writer.abort()  # the client went away while committing
        self.assertEqual((self.queue.count, self.seen), (0, []))
        self.assertRaises(QueueError, writer.write, b"more")
        self.threads.pool.run()
        message = self.successResultOf(d)
        self.assertEqual(len(synced), 4)  # body, envelope, temp dir, queue dir
        self.assertEqual(synced[-1], self.dir)
        self.assertEqual(self.queue.get(message.id), message)
        self.assertEqual(self.queue.count, 1)
        self.assertEqual(self.seen, [(message.id, message)])
        with self.queue.open_body(message.id) as f:
            self.assertEqual(f.read(), BODY)

    def test_disk_full_in_thread(self) -> None:
        """ENOSPC in the pool: QueueFullError, nothing left behind, slot freed."""

        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        writer = self.queue.begin("a@example.org", ["b@example.com"])
        writer.write(BODY)
        d = writer.commit_deferred()
        self.patch(os, "fsync", no_space)
        self.threads.pool.run()
        self.failureResultOf(d, QueueFullError)
        self.assertEqual(sorted(os.listdir(self.dir)), [])
        self.assertEqual(self.queue._writers, set())

    def test_limits_checked_before_thread(self) -> None:
        """The byte limit fails the commit at once; no work reaches the pool."""
        q = Queue(self.dir, clock=self.clock, threads=self.threads, max_bytes=len(BODY) - 1)
        writer = q.begin("a@example.org", ["b@example.com"])
        writer.write(BODY)
        self.failureResultOf(writer.commit_deferred(), QueueFullError)
        self.assertEqual(self.threads.pool.work, [])
        self.assertEqual(sorted(os.listdir(self.dir)), [])

    def test_without_threads_synchronous(self) -> None:
        q = Queue(self.dir, clock=self.clock)
        writer = q.begin("a@example.org", ["b@example.com"])
        writer.write(BODY)
        message = self.successResultOf(writer.commit_deferred())
        self.assertEqual(q.get(message.id), message)

    def test_small_body_no_file_until_commit(self) -> None:
        """
        A body up to BUFFERED_SIZE touches the disk only in the commit (in
        the pool); a larger one is streamed to its temp directory at once.
        """
        from mtasts_twisted.relay import BUFFERED_SIZE

        small = self.queue.begin("a@example.org", ["b@example.com"])
        small.write(b"x" * BUFFERED_SIZE)
        self.assertEqual(os.listdir(self.dir), [])
        big = self.queue.begin("a@example.org", ["b@example.com"])
        big.write(b"y" * BUFFERED_SIZE)
        big.write(b"y")
        [tmp] = os.listdir(self.dir)
        self.assertTrue(tmp.startswith("tmp-"))
        d1, d2 = small.commit_deferred(), big.commit_deferred()
        self.threads.pool.run()
        m1, m2 = self.successResultOf(d1), self.successResultOf(d2)
        for m, size in ((m1, BUFFERED_SIZE), (m2, BUFFERED_SIZE + 1)):
            with self.queue.open_body(m.id) as f:
                self.assertEqual(len(f.read()), size)
            self.assertEqual(m.size, size)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted([m1.id, m2.id]))
        aborted = self.queue.begin("a@example.org", ["b@example.com"])
        aborted.write(b"z" * (BUFFERED_SIZE + 1))
        aborted.abort()
        self.assertEqual(sorted(os.listdir(self.dir)), sorted([m1.id, m2.id]))

    def test_remove_fsync_in_pool(self) -> None:
        """
        remove: the rename at once (the message is gone for every reader),
        the directory fsync and the deletion in the pool.
        """
        writer = self.queue.begin("a@example.org", ["b@example.com"])
        writer.write(BODY)
        d = writer.commit_deferred()
        self.threads.pool.run()
        message = self.successResultOf(d)
        synced: list[int] = []
        self.patch(os, "fsync", synced.append)
        self.queue.remove(message.id)
        self.assertEqual(os.listdir(self.dir), ["del-" + message.id])
        self.assertEqual((synced, self.queue.count, self.queue.total_bytes), ([], 0, 0))
        self.assertEqual(self.seen[-1], (message.id, None))
        self.assertRaises(UnknownMessageError, self.queue.get, message.id)
        self.threads.pool.run()
        self.assertEqual(len(synced), 1)
        self.assertEqual(os.listdir(self.dir), [])
