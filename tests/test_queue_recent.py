"""
The relay queue keeps what it just committed for the first delivery
attempt (mtasts_twisted.relay.recent): small bodies in memory, bounded;
the parsed envelope in its stat-keyed cache; the files stay the truth.
"""

from __future__ import annotations

import os
import shutil

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.relay import queue as queue_module
from mtasts_twisted.relay.errors import UnknownMessageError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.recent import RecentBodies
from mtasts_twisted.relay.recovery import ID_RE
from mtasts_twisted.relay.spool import BODY_NAME, BUFFERED_SIZE

SMALL = b"Subject: hi\r\n\r\nhello\r\n"


class RecentBodiesTests(SynchronousTestCase):
    def test_bounded_oldest_first(self) -> None:
        recent = RecentBodies(max_bytes=10)
        recent.put("a", b"1234")
        recent.put("b", b"5678")
        recent.put("c", b"90ab")  # 12 > 10: "a" goes
        self.assertIsNone(recent.get("a"))
        self.assertEqual((recent.get("b"), recent.get("c"), recent.size, len(recent)), (b"5678", b"90ab", 8, 2))
        recent.put("big", b"x" * 11)  # never fits: nothing dropped for it
        self.assertIsNone(recent.get("big"))
        self.assertEqual(len(recent), 2)
        recent.put("b", b"12")  # replaced, not counted twice
        self.assertEqual(recent.size, 6)
        recent.pop("b")
        recent.pop("absent")
        self.assertEqual((recent.size, len(recent)), (4, 1))

    def test_zero_keeps_nothing(self) -> None:
        recent = RecentBodies(max_bytes=0)
        recent.put("a", b"1")
        self.assertEqual((len(recent), recent.size), (0, 0))


class QueueRecentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.queue = Queue(self.dir)

    def commit(self, body: bytes) -> str:
        writer = self.queue.begin("alice@example.org", ["bob@example.com"])
        writer.write(body)
        return writer.commit().id

    def test_first_read_from_memory(self) -> None:
        """A buffered body is read back from memory: the file is not opened."""
        ident = self.commit(SMALL)
        with open(os.path.join(self.dir, ident, BODY_NAME), "wb") as f:
            f.write(b"changed on disk")  # never happens; shows which copy is read
        with self.queue.open_body(ident) as body:
            self.assertEqual(body.read(), SMALL)

    def test_large_body_from_its_file(self) -> None:
        big = (b"x" * 78 + b"\r\n") * (BUFFERED_SIZE // 80 + 10)
        ident = self.commit(big)
        self.assertIsNone(self.queue._recent.get(ident))
        with self.queue.open_body(ident) as body:
            self.assertEqual(body.read(), big)

    def test_removed(self) -> None:
        ident = self.commit(SMALL)
        self.queue.remove(ident)
        self.assertEqual(len(self.queue._recent), 0)
        self.assertRaises(UnknownMessageError, self.queue.open_body, ident)

    def test_removed_by_another_process(self) -> None:
        """Deleted behind the queue's back (queue delete): as the file would say."""
        ident = self.commit(SMALL)
        shutil.rmtree(os.path.join(self.dir, ident))
        self.assertRaises(UnknownMessageError, self.queue.open_body, ident)
        self.assertIsNone(self.queue._recent.get(ident))

    def test_envelope_not_read_back(self) -> None:
        """The envelope just written is not read and parsed again; an update is."""
        ident = self.commit(SMALL)
        reads = []
        real = queue_module.read_envelope

        def counting(path: str):
            reads.append(path)
            return real(path)

        self.patch(queue_module, "read_envelope", counting)
        message = self.queue.get(ident)
        self.assertEqual((message.id, message.size), (ident, len(SMALL)))
        self.assertEqual(reads, [])
        updated = attrs.evolve(message, attempts=1)
        self.queue.update(updated)
        self.assertEqual(self.queue.get(ident).attempts, 1)
        # Another process rewrites the envelope: the stat key changes, it is read.
        Queue(self.dir).update(attrs.evolve(updated, attempts=2))
        self.assertEqual(self.queue.get(ident).attempts, 2)
        self.assertTrue(reads)

    def test_ids_unique(self) -> None:
        ids = {self.queue._new_id(1.0) for _ in range(5000)}
        self.assertEqual(len(ids), 5000)
        self.assertTrue(all(ID_RE.match(i) for i in ids))
        self.assertNotEqual(Queue(self.dir)._new_id(1.0), Queue(self.dir)._new_id(1.0))
