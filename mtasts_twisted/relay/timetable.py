"""
The delivery workers' in-memory schedule, L{Timetable}: which queued
message needs looking at when, and which wait for a slot of a domain at
its concurrency limit.  L{RelayService<mtasts_twisted.relay.workers.RelayService>}
decides what to start; this module only keeps the times.

Scheduling costs O(log n) per started delivery, not O(backlog): every
queued message's envelope is kept in memory (current through the queue's
observer for this process's own writes, and through the periodic fresh
listing for other processes' C{mtasts-twisted queue retry/delete}), with a
heap of (due time, id) — due is the earliest C{next_attempt} of a pending
recipient not in flight, or the expiry time — and, per recipient domain at
its concurrency limit, the due messages waiting for a slot in arrival
order.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterator

from mtasts_twisted.relay.envelope import QueuedMessage, RecipientStatus

__all__ = ["Timetable"]


class Timetable:
    """
    When each queued message is due (see the module docstring).

    @ivar messages: every queued message by id, oldest first.
    @ivar bytes: the sum of their sizes.
    @ivar waiting: per domain at its limit, id -> due time of the messages
        waiting for a slot (an insertion-ordered dict as a FIFO set).
    @ivar freed: domains of finished deliveries that have messages waiting.
    """

    def __init__(self, expiry: float, in_flight: Container[tuple[str, str]]) -> None:
        """
        @param expiry: seconds after arrival when pending recipients fail.
        @param in_flight: the (message id, domain) pairs being delivered
            (read only; the workers keep it).
        """
        self._expiry = expiry
        self._in_flight = in_flight
        self.messages: dict[str, QueuedMessage] = {}
        self.bytes = 0
        #: (due, id) entries; one is current per id, the one in _due_at:
        #: superseded entries are skipped when they come up (lazy deletion).
        self._heap: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        self.waiting: dict[str, dict[str, float]] = {}
        self.freed: set[str] = set()

    def due_at(self, ident: str) -> float | None:
        """When C{ident} is due (L{None}: not scheduled)."""
        return self._due_at.get(ident)

    def track(self, message: QueuedMessage, now: float) -> None:
        """Remember C{message} (new or changed) and when it is due."""
        old = self.messages.get(message.id)
        if old is not None:
            self.bytes -= old.size
        self.messages[message.id] = message
        self.bytes += message.size
        self.reschedule(message, now)

    def forget(self, ident: str) -> None:
        """C{ident} left the queue."""
        old = self.messages.pop(ident, None)
        if old is not None:
            self.bytes -= old.size
        self._due_at.pop(ident, None)

    def _due(self, message: QueuedMessage, now: float) -> float | None:
        """When C{message} needs looking at; L{None}: when a delivery of it ends."""
        pending = False
        due: float | None = None
        for r in message.recipients:
            if r.state is not RecipientStatus.PENDING:
                continue
            pending = True
            if (message.id, r.domain) in self._in_flight:
                continue  # looked at again when that delivery ends
            if due is None or r.next_attempt < due:
                due = r.next_attempt
        if not pending:
            return message.created  # done: remove it (once nothing is in flight)
        if due is None:
            return None
        expires = message.created + self._expiry
        if expires <= now:
            # Already expired: what is left is looked at when due (e.g. a
            # DSN that could not be queued is tried again at its
            # next_attempt, not in a busy loop).
            return due
        return min(due, expires)

    def reschedule(self, message: QueuedMessage, now: float) -> None:
        """Look at C{message} when its recipients say (see L{_due})."""
        due = self._due(message, now)
        if due is None:
            self._due_at.pop(message.id, None)
        elif self._due_at.get(message.id) != due:
            self._due_at[message.id] = due
            heapq.heappush(self._heap, (due, message.id))

    def schedule(self, ident: str, due: float) -> None:
        """Look at C{ident} no later than C{due}."""
        if self._due_at.get(ident, float("inf")) > due:
            self._due_at[ident] = due
            heapq.heappush(self._heap, (due, ident))

    def wait_for_slot(self, domain: str, ident: str, due: float) -> None:
        """C{ident} is due but C{domain} is at its limit: first come, first served."""
        self.waiting.setdefault(domain, {}).setdefault(ident, due)

    def pop_due(self, now: float) -> Iterator[tuple[str, float]]:
        """
        The (id, due time) of each message due by C{now}, earliest first,
        each unscheduled as it is yielded; stop iterating to leave the rest.
        """
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, ident = heapq.heappop(heap)
            if self._due_at.get(ident) != due:
                continue  # superseded
            del self._due_at[ident]
            yield ident, due

    def reload(self, listed: list[QueuedMessage], held: Container[str], now: float) -> None:
        """
        Follow a fresh listing of the queue directory (the periodic poll):
        O(queue).

        @param held: ids whose newer envelopes are in memory only (not
            written yet): their listed envelopes are older.
        """
        known = self.messages
        seen = set()
        for message in listed:
            seen.add(message.id)
            if message.id in held:
                continue  # the newer outcomes are in memory
            old = known.get(message.id)
            if old is not message and old != message:
                self.track(message, now)
            elif message.id not in self._due_at:
                # Normally waiting for its delivery to end or for a domain
                # slot; this also catches a message whose schedule was lost
                # on an unexpected path (looked at again, at worst once per
                # poll).
                self.reschedule(message, now)
        for ident in [i for i in known if i not in seen]:
            self.forget(ident)
        # Messages waiting for a domain slot may have been retried (then
        # they are rescheduled above) or deleted (skipped when they come
        # up); rebuilding the heap drops superseded entries.
        if len(self._heap) > 2 * len(self._due_at) + 64:
            self._heap = [(due, ident) for ident, due in self._due_at.items()]
            heapq.heapify(self._heap)
