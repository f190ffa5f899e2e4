"""
Envelopes are validated on load (issue 17.6): non-finite or absurd times,
wrong types and huge values are refused by
L{mtasts_twisted.relay.envelope.decode_envelope}, quarantined by
L{Queue.recover}, skipped by the listing, and can never stall the
delivery workers' schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.delivery import Status
from mtasts_twisted.relay import Queue, RelayService
from mtasts_twisted.relay.envelope import MAX_ENVELOPE_BYTES, MAX_TEXT_LENGTH, decode_envelope, encode_envelope
from tests.test_relay import MESSAGE, FakeDeliverer, settings

BODY = b"Subject: hello\r\n\r\nHi.\r\n"

Edit = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data[key] = value

    return edit


def _set_rcpt(key: str, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data["recipients"][0][key] = value

    return edit


#: name -> a change to a good envelope's JSON that makes it invalid.
BAD: dict[str, Edit] = {
    "created NaN": _set("created", float("nan")),
    "created inf": _set("created", float("inf")),
    "created -inf": _set("created", float("-inf")),
    "created 1e400 (inf once parsed)": _set("created", "1e400-marker"),
    "created negative": _set("created", -5.0),
    "created year 10000+": _set("created", 1e15),
    "created string": _set("created", "1700000000"),
    "created bool": _set("created", True),
    "created null": _set("created", None),
    "next_attempt NaN": _set_rcpt("next_attempt", float("nan")),
    "next_attempt inf": _set_rcpt("next_attempt", float("inf")),
    "next_attempt huge": _set_rcpt("next_attempt", 1e300),
    "next_attempt list": _set_rcpt("next_attempt", [1]),
    "size negative": _set("size", -1),
    "size float": _set("size", 12.5),
    "size huge": _set("size", 10**30),
    "size string": _set("size", "12"),
    "attempts negative": _set("attempts", -1),
    "attempts huge": _set("attempts", 10**20),
    "attempts bool": _set("attempts", True),
    "recipient attempts NaN": _set_rcpt("attempts", float("nan")),
    "recipient attempts huge": _set_rcpt("attempts", 10**20),
    "recipients not a list": _set("recipients", "bob@example.com"),
    "recipients empty": _set("recipients", []),
    "recipient not an object": _set("recipients", ["bob@example.com"]),
    "too many recipients": lambda d: d.__setitem__("recipients", d["recipients"] * 20_000),
    "state unknown": _set_rcpt("state", "lost"),
    "address number": _set_rcpt("address", 5),
    "address huge": _set_rcpt("address", "b" * 100_000 + "@example.com"),
    "sender huge": _set("sender", "a" * 100_000 + "@example.org"),
    "sender null": _set("sender", None),
    "id number": _set("id", 1),
    "reason number": _set_rcpt("reason", 421),
    "last_error object": _set("last_error", {"x": 1}),
    "not an object": lambda d: d.clear(),
}


def bad_bytes(good: bytes, edit: Edit) -> bytes:
    data = json.loads(good)
    edit(data)
    text = json.dumps(data) if data else "[]"
    return text.replace('"1e400-marker"', "1e400").encode()


class DecodeTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="mtasts-envelope-")
        self.addCleanup(shutil.rmtree, directory, True)
        clock = Clock()
        clock.advance(1_700_000_000)
        self.queue = Queue(directory, clock=clock)
        self.message = self.queue.enqueue("a@example.org", ["b@example.com"], BODY)
        self.good = encode_envelope(self.message)

    def test_good_round_trip(self) -> None:
        self.assertEqual(decode_envelope(self.good), self.message)

    def test_bad_refused(self) -> None:
        """Each bad envelope raises ValueError, KeyError or TypeError (what recovery quarantines)."""
        accepted = []
        for name, edit in BAD.items():
            try:
                decode_envelope(bad_bytes(self.good, edit))
            except (ValueError, KeyError, TypeError):
                continue
            accepted.append(name)
        self.assertEqual(accepted, [])

    def test_deep_nesting_refused(self) -> None:
        """JSON nested beyond the parser's recursion is a ValueError, not a RecursionError."""
        self.assertRaises(ValueError, decode_envelope, b"[" * 200_000 + b"]" * 200_000)

    def test_oversized_refused(self) -> None:
        data = json.loads(self.good)
        data["last_error"] = "x" * MAX_ENVELOPE_BYTES
        try:
            decode_envelope(json.dumps(data).encode())
        except ValueError:
            pass
        else:
            self.fail("an envelope over MAX_ENVELOPE_BYTES was read")

    def test_long_texts_cut(self) -> None:
        """A long reason (a server's reply) is kept, cut to MAX_TEXT_LENGTH, not refused."""
        data = json.loads(self.good)
        data["recipients"][0]["reason"] = "y" * (MAX_TEXT_LENGTH + 100)
        data["last_error"] = "z" * (MAX_TEXT_LENGTH + 100)
        message = decode_envelope(json.dumps(data).encode())
        self.assertEqual(len(message.recipients[0].reason or ""), MAX_TEXT_LENGTH)
        self.assertEqual(len(message.last_error or ""), MAX_TEXT_LENGTH)

    def test_ints_for_times(self) -> None:
        """Integral times (as a hand-edited envelope may have) are fine."""
        data = json.loads(self.good)
        data["created"] = 1_700_000_000
        data["recipients"][0]["next_attempt"] = 0
        self.assertEqual(decode_envelope(json.dumps(data).encode()).created, 1_700_000_000.0)


class QuarantineTests(SynchronousTestCase):
    """Recovery quarantines every bad envelope; the workers deliver the rest."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mtasts-envelope-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def corrupt(self, queue: Queue, ident: str, edit: Edit) -> None:
        path = os.path.join(self.dir, ident, "envelope.json")
        with open(path, "rb") as f:
            good = f.read()
        with open(path, "wb") as f:
            f.write(bad_bytes(good, edit))

    def test_recover_quarantines_each(self) -> None:
        queue = Queue(self.dir, clock=self.clock)
        good = queue.enqueue("a@example.org", ["b@example.com"], BODY)
        bad = {}
        for name, edit in BAD.items():
            self.clock.advance(1)
            message = queue.enqueue("a@example.org", ["b@example.com"], BODY)
            self.corrupt(queue, message.id, edit)
            bad[message.id] = name
        self.assertEqual(Queue(self.dir).recover(), [good])
        quarantined = {name.split(".")[0] for name in Queue(self.dir).quarantined()}
        self.assertEqual(quarantined, set(bad))
        self.flushLoggedErrors()

    def test_nan_does_not_stall_workers(self) -> None:
        """
        One NaN envelope among good ones: the good ones are delivered, the
        bad one quarantined, and the queue-age metric is right.
        """
        s = settings(poll_interval=5)
        queue = s.make_queue(self.dir, clock=self.clock)
        bad = queue.enqueue("a@example.org", ["nan@example.net"], MESSAGE)
        self.corrupt(queue, bad.id, _set_rcpt("next_attempt", float("nan")))
        self.clock.advance(1)
        good = [queue.enqueue("a@example.org", [f"r{i}@example.com"], MESSAGE) for i in range(3)]
        deliverer = FakeDeliverer()
        service = RelayService(queue, deliverer, s, self.clock)
        self.addCleanup(service.stopService)
        service.startService()
        self.assertEqual(sorted(c[1][0] for c in deliverer.calls), sorted(m.recipients[0].address for m in good))
        self.assertEqual(len(queue.quarantined()), 1)
        self.clock.advance(60)
        self.assertEqual(service.stats["oldest_age"], 60)
        for i in range(3):
            deliverer.fire(i, Status.DELIVERED)
        self.assertEqual(queue.list(), [])
        self.flushLoggedErrors()

    def test_nan_written_while_running(self) -> None:
        """An envelope spoilt while the relay runs is skipped by the poll, never scheduled."""
        s = settings(poll_interval=5, retry_base=3600)
        queue = s.make_queue(self.dir, clock=self.clock)
        first = queue.enqueue("a@example.org", ["b@example.com"], MESSAGE)
        deliverer = FakeDeliverer()
        service = RelayService(queue, deliverer, s, self.clock)
        self.addCleanup(service.stopService)
        service.startService()
        deliverer.fire(0, Status.TRANSIENT, 421, "4.7.0 later")
        self.corrupt(queue, first.id, _set_rcpt("next_attempt", float("nan")))
        self.clock.advance(5)
        second = queue.enqueue("a@example.org", ["c@example.com"], MESSAGE)
        self.clock.advance(5)
        self.assertEqual([c[1] for c in deliverer.calls], [["b@example.com"], ["c@example.com"]])
        self.assertEqual(service.stats["queue_messages"], 1)
        self.assertEqual([m.id for m in queue.list()], [second.id])
        self.flushLoggedErrors()
