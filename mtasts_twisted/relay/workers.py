"""
The relay's delivery workers (L{RelayService}): which queued mail to
deliver now, within the limits, and the periodic poll of the queue.

Every C{poll_interval} (and when mail arrives or a delivery ends) due
pending recipients are grouped per message and recipient domain, and each
group is one C{deliver(sender, recipients, body)} call, within the global
and per-domain concurrency limits.  When each message is due is kept by
the L{Timetable<mtasts_twisted.relay.timetable.Timetable>}; what an
outcome does (retries, expiry, DSNs) is the
L{OutcomeRecorder<mtasts_twisted.relay.outcomes.OutcomeRecorder>}'s.
MTA-STS enforce failures are transient outcomes of the deliverer and are
simply retried.  The poll survives its own errors (a short file
descriptor exhaustion, an unreadable directory): it is logged, backs off
and goes on (L{mtasts_twisted.periodic.Periodic}).

Guarantees: a message is accepted only once durable; a (message, domain)
group is never delivered twice concurrently (in-memory set).  Each
outcome is written to the envelope (fsync) as soon as the deliverer
reports it, and a DSN is queued (fsync) I{before} the recipient is marked
failed.  After a crash, work in flight is simply done again: every
accepted message is delivered at least once, or still queued.  The only
way to a duplicate at the final MX is the window between the MX's reply
to the final dot and our envelope fsync (the inherent SMTP duplicate
window, RFC 1047); a crash there can also duplicate a DSN.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.interfaces import IDeliverer
from mtasts_twisted.periodic import Periodic
from mtasts_twisted.relay.envelope import QueuedMessage, RecipientStatus
from mtasts_twisted.relay.errors import QueueError
from mtasts_twisted.relay.outcomes import DeliveryGroup, Outcome, OutcomeRecorder
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.settings import RelaySettings
from mtasts_twisted.relay.timetable import Timetable

__all__ = ["IDeliverer", "RelayService"]

log = Logger()

#: The longest wait between polls while they fail (unless C{poll_interval}
#: is longer): mail retried with C{mtasts-twisted queue retry} is seen at
#: most this long after the cause went away.
POLL_MAX_BACKOFF = 30.0


class RelayService(Service):
    """
    Delivery workers over a L{Queue} (see the module docstring).

    @ivar stats: metrics: C{queue_messages}, C{queue_bytes},
        C{oldest_age} (seconds), C{in_flight}, C{deliveries} (a C{Counter}
        by outcome: C{delivered}, C{transient}, C{permanent}, C{expired},
        C{error}), C{dsn_queued}.
    @ivar poll: the periodic poll (a L{Periodic}) while running.
    """

    def __init__(
        self, queue: Queue, deliverer: IDeliverer, settings: RelaySettings, clock: IReactorTime
    ) -> None:
        self.queue = queue
        self.deliverer = deliverer
        self.settings = settings
        self.clock = clock
        self.in_flight: set[tuple[str, str]] = set()
        self._per_domain: Counter[str] = Counter()
        self.poll: Periodic | None = None
        self._wake_call: IDelayedCall | None = None
        self._running_deliveries: set[Deferred[None]] = set()
        self._timetable = Timetable(settings.expiry, self.in_flight)
        self.stats: dict[str, Any] = {
            "queue_messages": 0,
            "queue_bytes": 0,
            "oldest_age": 0.0,
            "in_flight": 0,
            "deliveries": Counter(),
            "dsn_queued": 0,
        }
        self._outcomes = OutcomeRecorder(queue, settings, clock, self.stats, self.in_flight)
        queue.add_observer(self._observed)

    @property
    def unwritten(self) -> dict[str, QueuedMessage]:
        """Envelopes kept in memory until they can be written (L{OutcomeRecorder.unwritten})."""
        return self._outcomes.unwritten

    def startService(self) -> None:
        """Recover the queue, then poll it every C{poll_interval}."""
        Service.startService(self)
        self.queue.recover()
        self.poll = Periodic("relay queue poll", self.tick, self.settings.poll_interval, self.clock,
                             max_backoff=POLL_MAX_BACKOFF)
        self.poll.start(now=True)

    def stopService(self) -> Deferred[None] | None:
        """
        Stop picking new work.  Deliveries in flight go on and record
        their outcomes; a process that exits before they end retries them
        at the next start (at-least-once).  A deliverer with C{close}
        (L{mtasts_twisted.delivery.Deliverer.close}) stops keeping SMTP
        sessions for reuse and says QUIT to the parked ones; the returned
        L{Deferred} fires when they are closed.
        """
        Service.stopService(self)
        if self.poll is not None:
            self.poll.stop()
        self.poll = None
        if self._wake_call is not None and self._wake_call.active():
            self._wake_call.cancel()
        self._wake_call = None
        close = getattr(self.deliverer, "close", None)
        if close is None:
            return None
        # Parked sessions would otherwise stay open until their idle timer.
        return close()

    def wake(self, *ignored: Any) -> None:
        """Look for due work soon (new mail, a finished delivery)."""
        if self.running and (self._wake_call is None or not self._wake_call.active()):
            self._wake_call = self.clock.callLater(0, self._woken)

    def _woken(self) -> None:
        try:
            self.tick(fresh=False)
        except Exception:
            # The next wake-up or poll tries again.
            log.failure("relay wake-up failed")

    def wait_idle(self) -> Deferred[Any]:
        """Fire when the deliveries in flight now have ended (for tests)."""
        from twisted.internet.defer import DeferredList

        return DeferredList(list(self._running_deliveries))

    # -- the schedule ------------------------------------------------------

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _observed(self, ident: str, message: QueuedMessage | None) -> None:
        # The queue committed, updated or removed a message (durably).
        if message is None:
            self._timetable.forget(ident)
        else:
            now = self._now()
            self._timetable.track(message, now)
            due = self._timetable.due_at(ident)
            if due is not None and due <= now:
                self.wake()

    def tick(self, fresh: bool = True) -> None:
        """
        Start every due delivery the concurrency limits allow.

        @param fresh: re-read the queue directory (the periodic poll, which
            also sees what C{mtasts-twisted queue} changed); a wake-up after
            new mail or a finished delivery uses the in-memory schedule.
        """
        now = self._now()
        timetable = self._timetable
        unwritten = self._outcomes.unwritten
        if fresh:
            timetable.reload(self.queue.list(fresh=True), unwritten, now)
        for ident in list(unwritten):
            written = self._outcomes.write_unwritten(ident)
            if written is not None:
                timetable.track(written, now)
        limit = self.settings.concurrency
        per_domain = self.settings.concurrency_per_domain
        # Messages waiting for a slot of a domain whose delivery ended go
        # first: they were due before anything still in the schedule.
        while timetable.freed and len(self.in_flight) < limit:
            domain = timetable.freed.pop()
            waiting = timetable.waiting.get(domain)
            while waiting and len(self.in_flight) < limit and self._per_domain[domain] < per_domain:
                ident = next(iter(waiting))
                due = waiting.pop(ident)
                message = timetable.messages.get(ident)
                if message is not None and ident not in unwritten:
                    self._consider(message, now, due)
            if waiting and self._per_domain[domain] < per_domain:
                timetable.freed.add(domain)  # the global limit stopped it
                break
            if not waiting:
                timetable.waiting.pop(domain, None)
        if len(self.in_flight) < limit:
            for ident, due in timetable.pop_due(now):
                message = timetable.messages.get(ident)
                if message is not None and ident not in unwritten:
                    self._consider(message, now, due)
                # else: gone, or held until its outcomes are on disk
                if len(self.in_flight) >= limit:
                    break
        self._update_stats(now)

    def _consider(self, message: QueuedMessage, now: float, due: float) -> None:
        """Expire, remove or start the deliveries of a message that came due."""
        expires = message.created + self.settings.expiry
        if now >= expires:
            self._outcomes.expire(message)
            return
        groups: dict[str, list[str]] = {}
        later: float | None = None
        for r in message.recipients:
            if r.state is not RecipientStatus.PENDING:
                continue
            if (message.id, r.domain) in self.in_flight:
                continue
            if r.next_attempt <= now:
                groups.setdefault(r.domain, []).append(r.address)
            elif later is None or r.next_attempt < later:
                later = r.next_attempt
        if not groups and later is None:
            self._outcomes.finish_if_done(message)
            return
        for domain, recipients in groups.items():
            if len(self.in_flight) >= self.settings.concurrency:
                self._timetable.schedule(message.id, due)  # first in line for the next slot
                break
            if self._per_domain[domain] >= self.settings.concurrency_per_domain:
                self._timetable.wait_for_slot(domain, message.id, due)
                # Expiry does not wait for the domain's slot.
                later = min(later if later is not None else float("inf"), expires)
                continue
            self._start(message, DeliveryGroup(message.id, domain, tuple(recipients)))
        if later is not None:
            self._timetable.schedule(message.id, min(later, expires))

    def _update_stats(self, now: float) -> None:
        messages = self._timetable.messages
        self.stats["queue_messages"] = len(messages)
        self.stats["queue_bytes"] = self._timetable.bytes
        # Oldest first: the initial listing is sorted by id (arrival
        # time) and later arrivals are appended.
        oldest = next(iter(messages.values()), None)
        self.stats["oldest_age"] = max(0.0, now - oldest.created) if oldest else 0.0
        self.stats["in_flight"] = len(self.in_flight)

    # -- deliveries --------------------------------------------------------

    def _start(self, message: QueuedMessage, group: DeliveryGroup) -> None:
        key = (group.message_id, group.domain)
        self.in_flight.add(key)
        self._per_domain[group.domain] += 1
        self.stats["in_flight"] = len(self.in_flight)
        d = Deferred.fromCoroutine(self._deliver(message, group))
        self._running_deliveries.add(d)

        def done(result: object) -> None:
            self._running_deliveries.discard(d)
            self.in_flight.discard(key)
            self._per_domain[group.domain] -= 1
            if self._per_domain[group.domain] <= 0:
                del self._per_domain[group.domain]
            if group.domain in self._timetable.waiting:
                self._timetable.freed.add(group.domain)
            self.stats["in_flight"] = len(self.in_flight)
            if isinstance(result, Failure):
                log.failure(
                    "delivery of {id} to {domain} failed",
                    result,
                    id=group.message_id,
                    domain=group.domain,
                )
                # Looked at again after a poll interval (not at once: the
                # cause, e.g. no file descriptor for the body, may last).
                self._timetable.schedule(group.message_id, self._now() + self.settings.poll_interval)
            self.wake()

        d.addBoth(done)

    async def _deliver(self, message: QueuedMessage, group: DeliveryGroup) -> None:
        # No event here: the outcome is logged once per recipient (OutcomeRecorder.apply).
        try:
            body = self.queue.open_body(group.message_id)
        except QueueError:
            return  # deleted meanwhile (e.g. queue delete)
        outcomes: dict[str, Outcome] = {}
        try:
            try:
                result = await self.deliverer.deliver(
                    message.sender, list(group.recipients), body, smtputf8=message.smtputf8,
                    # Only when set: a deliverer that predates RFC 8689 fails
                    # loudly (TypeError) rather than ignoring the flag.
                    **({"requiretls": True} if message.requiretls else {}),
                )
                for outcome in result.outcomes:
                    outcomes[outcome.recipient] = (
                        outcome.status.value,
                        outcome.code,
                        outcome.message,
                        outcome.mx_host,
                    )
            except ValueError as e:
                # IDeliverer: ValueError means arguments it can never send (an
                # address it cannot write, e.g. queued before the intake
                # checked addresses, or an address literal): a permanent
                # failure (RFC 3463 5.1.3), not five days of retries.
                log.error("cannot deliver {id} to {domain}: {error}",
                          id=group.message_id, domain=group.domain, error=str(e))
                self.stats["deliveries"]["error"] += 1
                for r in group.recipients:
                    outcomes[r] = ("permanent", None, f"5.1.3 {e}", None)
            except Exception as e:  # noqa: BLE001 - any deliverer bug: retry later
                log.failure("deliverer failed for {id} at {domain}", id=group.message_id, domain=group.domain)
                self.stats["deliveries"]["error"] += 1
                for r in group.recipients:
                    outcomes[r] = ("transient", None, f"4.3.0 Internal error during delivery: {e}", None)
        finally:
            body.close()
        for r in group.recipients:
            # A recipient the deliverer did not report on is retried.
            outcomes.setdefault(r, ("transient", None, "4.3.0 No outcome reported", None))
        self.in_flight.discard((group.message_id, group.domain))  # this delivery is over
        self._outcomes.apply(group, outcomes)
