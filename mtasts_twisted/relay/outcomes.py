"""
What the delivery workers do with the deliverer's answer, L{OutcomeRecorder}:
each recipient's outcome written to its envelope (fsync), retries
scheduled, expiry, and the DSNs (RFC 3464) of failed recipients.

Per recipient: DELIVERED → marked; PERMANENT → a DSN to the sender at once
(unless the sender is null) and marked failed; TRANSIENT → retried after
C{retry_base * 2**(attempts-1)}, capped at C{retry_max}; older than
C{expiry} → failed with a DSN (C{4.4.7}, RFC 3463).  A DSN is queued
(fsync) I{before} the recipient is marked failed, so a crash in between
repeats the DSN rather than losing it.  A message whose recipients are all
done is removed.

The DSN of a REQUIRETLS message (RFC 8689 §5) is itself queued with the
REQUIRETLS flag and, like every DSN here, returns the header only.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtasts_twisted.relay.dsn import FailedRecipient, build_dsn, needs_dsn, read_headers, status_code_of
from mtasts_twisted.relay.envelope import MAX_TEXT_LENGTH, QueuedMessage, RecipientStatus
from mtasts_twisted.relay.errors import QueueError, QueueFullError
from mtasts_twisted.relay.queue import Queue
from mtasts_twisted.relay.settings import RelaySettings

__all__ = ["DeliveryGroup", "Outcome", "OutcomeRecorder"]

# The workers' events keep the namespace they had before this module was split off.
log = Logger(namespace="mtasts_twisted.relay.workers")

#: What a deliverer said about one recipient: (C{"delivered"},
#: C{"permanent"} or C{"transient"}; SMTP reply code; text; MX host).
Outcome = tuple[str, "int | None", str, "str | None"]


@attrs.frozen
class DeliveryGroup:
    """
    The recipients of one message at one domain: one delivery.

    @ivar message_id: the queue id.
    @ivar domain: the recipients' domain (lower case).
    @ivar recipients: the envelope recipients, as queued.
    """

    message_id: str
    domain: str
    recipients: tuple[str, ...]


class OutcomeRecorder:
    """
    Records outcomes, expiries and DSNs in the queue (see the module
    docstring).

    @ivar unwritten: envelopes whose outcomes could not be written (disk
        full, I/O error), by id: kept here and written again (by the
        workers, L{write_unwritten}) before the message is looked at, so a
        delivered recipient is not delivered again every poll while the
        disk is full.
    """

    def __init__(self, queue: Queue, settings: RelaySettings, clock: IReactorTime,
                 stats: dict[str, Any], in_flight: Collection[tuple[str, str]]) -> None:
        """
        @param stats: the workers' stats; C{deliveries} (a C{Counter}) and
            C{dsn_queued} are counted here.
        @param in_flight: the (message id, domain) pairs being delivered
            (read only): a message is removed only when none is left.
        """
        self.queue = queue
        self.settings = settings
        self.clock = clock
        self.stats = stats
        self._in_flight = in_flight
        self.unwritten: dict[str, QueuedMessage] = {}

    def _busy(self, ident: str) -> bool:
        return any(k[0] == ident for k in self._in_flight)

    def write_unwritten(self, ident: str) -> QueuedMessage | None:
        """Write the envelope kept for C{ident}; the message once it is on disk."""
        try:
            self.queue.update(self.unwritten[ident])
        except QueueError as e:
            if not isinstance(e, QueueFullError):
                self.unwritten.pop(ident, None)  # gone meanwhile
            return None
        except OSError:
            return None
        log.info("outcomes of {id} written after an earlier failure", id=ident)
        return self.unwritten.pop(ident)

    def apply(self, group: DeliveryGroup, outcomes: dict[str, Outcome]) -> None:
        """Record the outcomes of one delivery (its key is out of C{in_flight})."""
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
            # As long as an envelope keeps it (what is read back equals what is kept).
            reason = (f"{code} {text}" if code is not None else text)[:MAX_TEXT_LENGTH]
            self.stats["deliveries"][status] += 1
            if status == "delivered":
                state = attrs.evolve(
                    state,
                    state=RecipientStatus.DELIVERED,
                    reason=reason,
                    status_code=status_code_of(code, text, "2.0.0"),
                    remote_mta=mx,
                )
                log.info("delivered {id} to <{rcpt}> via {mx}", id=message.id, rcpt=address, mx=mx)
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
                    failed.append((address, "4.4.7", f"delivery time expired; last error: {reason}", mx))
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
        message = attrs.evolve(message, attempts=message.attempts + 1, last_error=last_error)
        self.commit(message, failed)

    def commit(self, message: QueuedMessage, failed: list[FailedRecipient]) -> None:
        """
        Write C{message} (or remove it when every recipient is final),
        after queueing a DSN about C{failed}.
        """
        # The DSN is durable before the recipients are marked failed: a
        # crash in between repeats the DSN rather than losing it.
        if failed and not self.send_dsn(message, failed):
            # No DSN could be queued (queue or disk full): keep those
            # recipients pending and try again later, never drop silently.
            retry_at = float(self.clock.seconds()) + self.settings.retry_base
            for address, _, _, _ in failed:
                state = message.recipient(address)
                message = message.with_recipient(
                    attrs.evolve(state, state=RecipientStatus.PENDING, next_attempt=retry_at)
                )
        if not message.pending and not self._busy(message.id):
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
            # Not on disk: keep it in memory (see the workers' tick) rather
            # than delivering again at every poll while the disk is full.
            log.error("cannot record the outcomes of {id}: {error}; kept in memory until it can",
                      id=message.id, error=str(e))
            self.unwritten[message.id] = message
            return
        except QueueError:
            return
        except OSError:
            log.failure("cannot update envelope of {id}; kept in memory until it can", id=message.id)
            self.unwritten[message.id] = message
            return
        self.unwritten.pop(message.id, None)
        self.finish_if_done(message)

    def finish_if_done(self, message: QueuedMessage) -> None:
        """Remove C{message} if no recipient is pending and none is in flight."""
        if message.pending or self._busy(message.id):
            return
        try:
            self.queue.remove(message.id)
        except QueueError:
            pass
        except OSError:
            # Tried again at the next poll.
            log.failure("cannot remove {id}", id=message.id)

    def expire(self, message: QueuedMessage) -> None:
        """Fail every pending recipient of C{message} (C{4.4.7}), with a DSN."""
        if self._busy(message.id):
            return
        failed: list[FailedRecipient] = []
        for r in message.pending:
            reason = r.reason or "no delivery attempt succeeded"
            failed.append((r.address, "4.4.7", f"delivery time expired; last error: {reason}", r.remote_mta))
            message = message.with_recipient(attrs.evolve(r, state=RecipientStatus.FAILED, status_code="4.4.7"))
            self.stats["deliveries"]["expired"] += 1
        if failed:
            log.warn(  # noqa: G010 - twisted.logger has warn, not warning
                "message {id} expired for {count} recipient(s)",
                id=message.id,
                count=len(failed),
            )
        self.commit(message, failed)

    def _queue_dsn(self, message: QueuedMessage, dsn: bytes) -> QueuedMessage:
        """
        Queue C{dsn} about C{message} with the null sender (RFC 3464 §1);
        about a REQUIRETLS message, tagged REQUIRETLS too (RFC 8689 §5:
        "MUST also specify the REQUIRETLS SMTP option"; as a bounce it is
        never discarded for want of it, see
        L{mtasts_twisted.delivery.requiretls}).  It holds the original
        header only, never the body (§5: as if C{RET=HDRS}; L{build_dsn}).
        """
        if not message.requiretls:
            return self.queue.enqueue("", [message.sender], dsn)
        writer = self.queue.begin("", [message.sender])
        try:
            writer.requiretls = True
            writer.write(dsn)
            return writer.commit()
        finally:
            writer.abort()

    def send_dsn(self, message: QueuedMessage, failed: list[FailedRecipient]) -> bool:
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
            queued = self._queue_dsn(message, dsn)
        except (QueueError, OSError) as e:
            log.error(
                "cannot queue DSN for {id} to <{sender}>: {error}",
                id=message.id,
                sender=message.sender,
                error=str(e),
            )
            return False
        self.stats["dsn_queued"] += 1
        log.info("DSN {dsn} queued to <{sender}> for {id}", dsn=queued.id, sender=message.sender, id=message.id)
        return True
