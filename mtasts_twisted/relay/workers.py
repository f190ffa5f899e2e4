"""
The relay's delivery workers (L{RelayService}): scheduling, retries,
expiry and DSNs over the L{Queue}.

Every C{poll_interval} (and when mail arrives or a delivery ends) due
pending recipients are grouped per message and recipient domain, and each
group is one C{deliver(sender, recipients, body)} call, within the global
and per-domain concurrency limits.  Per recipient: DELIVERED → marked; PERMANENT → a DSN to the sender at once
(unless the sender is null) and marked failed; TRANSIENT → retried after
C{retry_base * 2**(attempts-1)}, capped at C{retry_max}; older than
C{expiry} → failed with a DSN (C{4.4.7}, RFC 3463).  MTA-STS enforce
failures are transient outcomes of the deliverer and are simply retried.
A message whose recipients are all done is removed.

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

import heapq
from collections import Counter
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.interfaces import IDeliverer
from mtasts_twisted.relay.dsn import FailedRecipient, build_dsn, needs_dsn, read_headers, status_code_of
from mtasts_twisted.relay.envelope import QueuedMessage, RecipientStatus
from mtasts_twisted.relay.errors import QueueError, QueueFullError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.settings import RelaySettings

__all__ = ["IDeliverer", "RelayService"]

log = Logger()


#: What a deliverer said about one recipient: (C{"delivered"},
#: C{"permanent"} or C{"transient"}; SMTP reply code; text; MX host).
_Outcome = tuple[str, "int | None", str, "str | None"]


@attrs.frozen
class _Group:
    """The recipients of one message at one domain: one delivery."""

    message_id: str
    domain: str
    recipients: tuple[str, ...]


class RelayService(Service):
    """
    Delivery workers over a L{Queue} (see the module docstring).

    Scheduling costs O(log n) per started delivery, not O(backlog): the
    service keeps every queued message's envelope in memory (kept current
    by the queue's observer for this process's own writes, and by the
    periodic fresh listing for other processes' C{mtasts-twisted queue
    retry/delete}), a heap of (due time, id) — due is the earliest
    C{next_attempt} of a pending recipient not in flight, or the expiry
    time — and, per recipient domain at its concurrency limit, the due
    messages waiting for a slot in arrival order.

    @ivar stats: metrics: C{queue_messages}, C{queue_bytes},
        C{oldest_age} (seconds), C{in_flight}, C{deliveries} (a C{Counter}
        by outcome: C{delivered}, C{transient}, C{permanent}, C{expired},
        C{error}), C{dsn_queued}.
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
        self._loop: LoopingCall | None = None
        self._wake_call: IDelayedCall | None = None
        self._running_deliveries: set[Deferred[None]] = set()
        #: Envelopes whose outcomes could not be written (disk full, I/O
        #: error), by id: kept here and written again before the message
        #: is looked at, so a delivered recipient is not delivered again
        #: every poll while the disk is full.
        self.unwritten: dict[str, QueuedMessage] = {}
        #: Every queued message by id, oldest first (see the class docstring).
        self._messages: dict[str, QueuedMessage] = {}
        self._bytes = 0
        #: (due, id) entries; one is current per id, the one in _due_at:
        #: superseded entries are skipped when they come up (lazy deletion).
        self._heap: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        #: Per domain at its limit: id -> due time of messages waiting for
        #: a slot (an insertion-ordered dict as a FIFO set).
        self._waiting: dict[str, dict[str, float]] = {}
        #: Domains of finished deliveries that have messages waiting.
        self._freed: set[str] = set()
        self.stats: dict[str, Any] = {
            "queue_messages": 0,
            "queue_bytes": 0,
            "oldest_age": 0.0,
            "in_flight": 0,
            "deliveries": Counter(),
            "dsn_queued": 0,
        }
        queue.add_observer(self._observed)

    def startService(self) -> None:
        """Recover the queue, then poll it every C{poll_interval}."""
        Service.startService(self)
        self.queue.recover()
        self._loop = LoopingCall(self.tick, fresh=True)
        self._loop.clock = self.clock
        self._loop.start(self.settings.poll_interval, now=True)

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
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
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
            self._wake_call = self.clock.callLater(0, self.tick, fresh=False)

    def wait_idle(self) -> Deferred[Any]:
        """Fire when the deliveries in flight now have ended (for tests)."""
        from twisted.internet.defer import DeferredList

        return DeferredList(list(self._running_deliveries))

    # -- the schedule ------------------------------------------------------

    def _observed(self, ident: str, message: QueuedMessage | None) -> None:
        # The queue committed, updated or removed a message (durably).
        if message is None:
            self._forget(ident)
        else:
            self._track(message)
            if self._due_at.get(ident, float("inf")) <= float(self.clock.seconds()):
                self.wake()

    def _track(self, message: QueuedMessage) -> None:
        old = self._messages.get(message.id)
        if old is not None:
            self._bytes -= old.size
        self._messages[message.id] = message
        self._bytes += message.size
        self._reschedule(message)

    def _forget(self, ident: str) -> None:
        old = self._messages.pop(ident, None)
        if old is not None:
            self._bytes -= old.size
        self._due_at.pop(ident, None)

    def _due(self, message: QueuedMessage) -> float | None:
        """When C{message} needs looking at; L{None}: when a delivery of it ends."""
        pending = False
        due: float | None = None
        for r in message.recipients:
            if r.state is not RecipientStatus.PENDING:
                continue
            pending = True
            if (message.id, r.domain) in self.in_flight:
                continue  # looked at again when that delivery ends
            if due is None or r.next_attempt < due:
                due = r.next_attempt
        if not pending:
            return message.created  # done: remove it (once nothing is in flight)
        if due is None:
            return None
        expires = message.created + self.settings.expiry
        if expires <= float(self.clock.seconds()):
            # Already expired: what is left is looked at when due (e.g. a
            # DSN that could not be queued is tried again at its
            # next_attempt, not in a busy loop).
            return due
        return min(due, expires)

    def _reschedule(self, message: QueuedMessage) -> None:
        due = self._due(message)
        if due is None:
            self._due_at.pop(message.id, None)
        elif self._due_at.get(message.id) != due:
            self._due_at[message.id] = due
            heapq.heappush(self._heap, (due, message.id))

    def _schedule(self, ident: str, due: float) -> None:
        """Look at C{ident} no later than C{due}."""
        if self._due_at.get(ident, float("inf")) > due:
            self._due_at[ident] = due
            heapq.heappush(self._heap, (due, ident))

    def _reload(self) -> None:
        """Follow the queue directory (the periodic poll): O(queue)."""
        listed = self.queue.list(fresh=True)
        known = self._messages
        seen = set()
        for message in listed:
            seen.add(message.id)
            if message.id in self.unwritten:
                continue  # the newer outcomes are in memory
            old = known.get(message.id)
            if old is not message and old != message:
                self._track(message)
            elif message.id not in self._due_at:
                # Normally waiting for its delivery to end or for a domain
                # slot; this also catches a message whose schedule was lost
                # on an unexpected path (looked at again, at worst once per
                # poll).
                self._reschedule(message)
        for ident in [i for i in known if i not in seen]:
            self._forget(ident)
        # Messages waiting for a domain slot may have been retried (then
        # they are rescheduled above) or deleted (skipped when they come
        # up); rebuilding the heap drops superseded entries.
        if len(self._heap) > 2 * len(self._due_at) + 64:
            self._heap = [(due, ident) for ident, due in self._due_at.items()]
            heapq.heapify(self._heap)

    def tick(self, fresh: bool = True) -> None:
        """
        Start every due delivery the concurrency limits allow.

        @param fresh: re-read the queue directory (the periodic poll, which
            also sees what C{mtasts-twisted queue} changed); a wake-up after
            new mail or a finished delivery uses the in-memory schedule.
        """
        now = float(self.clock.seconds())
        if fresh:
            self._reload()
        if self.unwritten:
            for ident in list(self.unwritten):
                self._write_unwritten(ident)
        limit = self.settings.concurrency
        # Messages waiting for a slot of a domain whose delivery ended go
        # first: they were due before anything still in the heap.
        while self._freed and len(self.in_flight) < limit:
            domain = self._freed.pop()
            waiting = self._waiting.get(domain)
            while (
                waiting
                and len(self.in_flight) < limit
                and self._per_domain[domain] < self.settings.concurrency_per_domain
            ):
                ident = next(iter(waiting))
                due = waiting.pop(ident)
                message = self._messages.get(ident)
                if message is not None and ident not in self.unwritten:
                    self._consider(message, now, due)
            if waiting and self._per_domain[domain] < self.settings.concurrency_per_domain:
                self._freed.add(domain)  # the global limit stopped it
                break
            if not waiting:
                self._waiting.pop(domain, None)
        heap = self._heap
        while heap and heap[0][0] <= now and len(self.in_flight) < limit:
            due, ident = heapq.heappop(heap)
            if self._due_at.get(ident) != due:
                continue  # superseded
            del self._due_at[ident]
            message = self._messages.get(ident)
            if message is None or ident in self.unwritten:
                continue  # gone, or held until its outcomes are on disk
            self._consider(message, now, due)
        self._update_stats(now)

    def _consider(self, message: QueuedMessage, now: float, due: float) -> None:
        """Expire, remove or start the deliveries of a message that came due."""
        if now - message.created >= self.settings.expiry:
            self._expire(message, now)
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
            self._finish_if_done(message)
            return
        for domain, recipients in groups.items():
            if len(self.in_flight) >= self.settings.concurrency:
                self._schedule(message.id, due)  # first in line for the next slot
                break
            if self._per_domain[domain] >= self.settings.concurrency_per_domain:
                self._waiting.setdefault(domain, {}).setdefault(message.id, due)
                # Expiry does not wait for the domain's slot.
                later = min(later if later is not None else float("inf"),
                            message.created + self.settings.expiry)
                continue
            self._start(message, _Group(message.id, domain, tuple(recipients)))
        if later is not None:
            self._schedule(message.id, min(later, message.created + self.settings.expiry))

    def _write_unwritten(self, ident: str) -> bool:
        try:
            self.queue.update(self.unwritten[ident])
        except QueueError as e:
            if not isinstance(e, QueueFullError):
                self.unwritten.pop(ident, None)  # gone meanwhile
            return False
        except OSError:
            return False
        log.info("outcomes of {id} written after an earlier failure", id=ident)
        message = self.unwritten.pop(ident)
        self._track(message)
        return True

    def _update_stats(self, now: float) -> None:
        messages = self._messages
        self.stats["queue_messages"] = len(messages)
        self.stats["queue_bytes"] = self._bytes
        # Oldest first: the initial listing is sorted by id (arrival
        # time) and later arrivals are appended.
        oldest = next(iter(messages.values()), None)
        self.stats["oldest_age"] = max(0.0, now - oldest.created) if oldest else 0.0
        self.stats["in_flight"] = len(self.in_flight)

    def _start(self, message: QueuedMessage, group: _Group) -> None:
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
            if group.domain in self._waiting:
                self._freed.add(group.domain)
            self.stats["in_flight"] = len(self.in_flight)
            if isinstance(result, Failure):
                log.failure(
                    "delivery of {id} to {domain} failed",
                    result,
                    id=group.message_id,
                    domain=group.domain,
                )
            self.wake()

        d.addBoth(done)

    async def _deliver(self, message: QueuedMessage, group: _Group) -> None:
        # No event here: the outcome is logged once per recipient (_apply).
        try:
            body = self.queue.open_body(group.message_id)
        except QueueError:
            return  # deleted meanwhile (e.g. queue delete)
        outcomes: dict[str, _Outcome] = {}
        try:
            try:
                result = await self.deliverer.deliver(
                    message.sender, list(group.recipients), body, smtputf8=message.smtputf8
                )
                for outcome in result.outcomes:
                    outcomes[outcome.recipient] = (
                        outcome.status.value,
                        outcome.code,
                        outcome.message,
                        outcome.mx_host,
                    )
            except Exception as e:  # noqa: BLE001 - any deliverer bug: retry later
                log.failure(
                    "deliverer failed for {id} at {domain}",
                    id=group.message_id,
                    domain=group.domain,
                )
                self.stats["deliveries"]["error"] += 1
                for r in group.recipients:
                    outcomes[r] = (
                        "transient",
                        None,
                        f"4.3.0 Internal error during delivery: {e}",
                        None,
                    )
        finally:
            body.close()
        for r in group.recipients:
            # A recipient the deliverer did not report on is retried.
            outcomes.setdefault(
                r, ("transient", None, "4.3.0 No outcome reported", None)
            )
        self._apply(group, outcomes)

    # -- outcomes ----------------------------------------------------------

    def _apply(
        self,
        group: _Group,
        outcomes: dict[str, _Outcome],
    ) -> None:
        self.in_flight.discard(
            (group.message_id, group.domain)
        )  # this delivery is over
        try:
            message = self.unwritten.get(group.message_id) or self.queue.get(group.message_id)
        except QueueError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            log.failure("cannot read envelope of {id}", id=group.message_id)
            return
        now = float(self.clock.seconds())
        failed: list[FailedRecipient] = []
        last_error = message.last_error
        for address in group.recipients:
            try:
                state = message.recipient(address)
            except KeyError:
                continue
            if state.state is not RecipientStatus.PENDING:
                continue
            status, code, text, mx = outcomes[address]
            reason = f"{code} {text}" if code is not None else text
            self.stats["deliveries"][status] += 1
            if status == "delivered":
                state = attrs.evolve(
                    state,
                    state=RecipientStatus.DELIVERED,
                    reason=reason,
                    status_code=status_code_of(code, text, "2.0.0"),
                    remote_mta=mx,
                )
                log.info(
                    "delivered {id} to <{rcpt}> via {mx}",
                    id=message.id,
                    rcpt=address,
                    mx=mx,
                )
            elif status == "permanent":
                state = attrs.evolve(
                    state,
                    state=RecipientStatus.FAILED,
                    reason=reason,
                    status_code=status_code_of(code, text, "5.0.0"),
                    remote_mta=mx,
                )
                failed.append((address, state.status_code or "5.0.0", reason, mx))
                last_error = reason
                log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                    "permanent failure of {id} to <{rcpt}>: {reason}",
                    id=message.id,
                    rcpt=address,
                    reason=reason,
                )
            else:
                attempts = state.attempts + 1
                last_error = reason
                code_str = status_code_of(code, text, "4.0.0")
                if code_str[0] == "5":
                    code_str = "4" + code_str[1:]
                if now - message.created >= self.settings.expiry:
                    state = attrs.evolve(
                        state,
                        state=RecipientStatus.FAILED,
                        attempts=attempts,
                        reason=reason,
                        status_code="4.4.7",
                        remote_mta=mx,
                    )
                    failed.append(
                        (
                            address,
                            "4.4.7",
                            f"delivery time expired; last error: {reason}",
                            mx,
                        )
                    )
                    self.stats["deliveries"]["expired"] += 1
                else:
                    delay = self.settings.retry_delay(attempts)
                    state = attrs.evolve(
                        state,
                        attempts=attempts,
                        next_attempt=now + delay,
                        reason=reason,
                        status_code=code_str,
                        remote_mta=mx,
                    )
                    log.info(
                        "transient failure of {id} to <{rcpt}>, retry in {delay}s: {reason}",
                        id=message.id,
                        rcpt=address,
                        delay=delay,
                        reason=reason,
                    )
            message = message.with_recipient(state)
        message = attrs.evolve(
            message, attempts=message.attempts + 1, last_error=last_error
        )
        self._commit(message, failed)

    def _commit(
        self, message: QueuedMessage, failed: list[FailedRecipient]
    ) -> None:
        # The DSN is durable before the recipients are marked failed: a
        # crash in between repeats the DSN rather than losing it.
        if failed and not self._send_dsn(message, failed):
            # No DSN could be queued (queue or disk full): keep those
            # recipients pending and try again later, never drop silently.
            retry_at = float(self.clock.seconds()) + self.settings.retry_base
            for address, _, _, _ in failed:
                state = message.recipient(address)
                message = message.with_recipient(
                    attrs.evolve(
                        state, state=RecipientStatus.PENDING, next_attempt=retry_at
                    )
                )
        if not message.pending and not any(k[0] == message.id for k in self.in_flight):
            # Every recipient is final: removing the message (an fsynced
            # rename) records that durably, so writing its envelope first
            # would only cost another fsync.
            try:
                self.queue.remove(message.id)
            except QueueError:
                pass  # already gone
            except OSError:
                log.failure("cannot remove {id}; recording its outcomes instead", id=message.id)
            else:
                self.unwritten.pop(message.id, None)
                return
        try:
            self.queue.update(message)
        except QueueFullError as e:
            # Not on disk: keep it in memory (see tick) rather than
            # delivering again at every poll while the disk is full.
            log.error("cannot record the outcomes of {id}: {error}; kept in memory until it can",
                      id=message.id, error=str(e))
            self.unwritten[message.id] = message
            return
        except QueueError:
            return
        except OSError:
            log.failure(
                "cannot update envelope of {id}; kept in memory until it can",
                id=message.id,
            )
            self.unwritten[message.id] = message
            return
        self.unwritten.pop(message.id, None)
        self._finish_if_done(message)

    def _finish_if_done(self, message: QueuedMessage) -> None:
        if message.pending or any(k[0] == message.id for k in self.in_flight):
            return
        try:
            self.queue.remove(message.id)
        except QueueError:
            pass
        except OSError:
            # Tried again at the next poll (see _reload).
            log.failure("cannot remove {id}", id=message.id)

    def _expire(self, message: QueuedMessage, now: float) -> None:
        if any(k[0] == message.id for k in self.in_flight):
            return
        failed: list[FailedRecipient] = []
        for r in message.pending:
            reason = r.reason or "no delivery attempt succeeded"
            failed.append(
                (
                    r.address,
                    "4.4.7",
                    f"delivery time expired; last error: {reason}",
                    r.remote_mta,
                )
            )
            message = message.with_recipient(
                attrs.evolve(r, state=RecipientStatus.FAILED, status_code="4.4.7")
            )
            self.stats["deliveries"]["expired"] += 1
        if failed:
            log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                "message {id} expired for {count} recipient(s)",
                id=message.id,
                count=len(failed),
            )
        self._commit(message, failed)

    def _send_dsn(
        self, message: QueuedMessage, failed: list[FailedRecipient]
    ) -> bool:
        """Queue a DSN about C{failed} if the sender gets one; C{False} if that failed."""
        if not needs_dsn(message.sender):
            log.info("no DSN for {id}: null sender", id=message.id)
            return True
        try:
            with self.queue.open_body(message.id) as body:
                headers = read_headers(body)
        except (QueueError, OSError):
            headers = b""
        dsn = build_dsn(
            message,
            failed,
            self.settings.reporting_mta,
            kind="failed",
            original_headers=headers,
            date=float(self.clock.seconds()),
        )
        try:
            queued = self.queue.enqueue(
                "", [message.sender], dsn
            )  # null sender, RFC 3464 §1
        except (QueueError, OSError) as e:
            log.error(
                "cannot queue DSN for {id} to <{sender}>: {error}",
                id=message.id,
                sender=message.sender,
                error=str(e),
            )
            return False
        self.stats["dsn_queued"] += 1
        log.info(
            "DSN {dsn} queued to <{sender}> for {id}",
            dsn=queued.id,
            sender=message.sender,
            id=message.id,
        )
        return True
