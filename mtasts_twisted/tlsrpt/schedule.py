"""
The daily TLSRPT report run: claim, look up, deliver, retry (RFC 8460 §4.1,
§5).

L{ReportScheduler} is a Twisted service.  Some time after 00:00 UTC (by
default a random delay of 5 minutes to 4 hours, drawn per day: RFC 8460
§4.1) it takes every (day, policy domain) of earlier days with results in
the C{tlsrpt_results} shelf and, for each:

 1. skips days with only successful sessions unless configured otherwise;
 2. claims the report in the C{tlsrpt_sends} shelf with one atomic
    C{update}: only the node whose update turned the key from absent to
    claimed sends, so several nodes sharing one PostgreSQL database send
    each report once.  The claim carries a snapshot of the results (and
    the results row is then deleted), so retries send the same report with
    the same report id;
 3. looks up C{_smtp._tls.<domain>} (RFC 8460 §3): no record (or not
    exactly one) drops the report; a temporary DNS failure retries later;
 4. delivers to every C{https:} rua (L{HTTPSReportSender}) and every
    C{mailto:} rua (the injected C{send_mail}, see
    L{mtasts_twisted.tlsrpt.mail.SendMail}); other schemes are ignored.
    The report is delivered when one endpoint accepted it (§3);
 5. otherwise retries with exponential backoff for up to 24 hours after the
    first attempt (§5.5), the schedule kept in the sends row so another
    node, or this one after a restart, carries on.

A claim is a lease: a node that dies mid-attempt leaves a row that any node
retries once the lease has run out, so in that case (only) a report may be
sent twice.  Results that reach the store after their report was claimed
(a node flushing late) are not reported; the minimum delay is far longer
than the aggregator's flush interval so that this does not happen in
practice.

L{SchedulerSettings} holds the timings (delays, retries, lease, how long
rows are kept).  The CLI uses L{ReportScheduler.pending},
L{ReportScheduler.preview} and L{ReportScheduler.send_now}.

This module is the claim, lease and timer service.  The rows and states of
the sends shelf are in L{mtasts_twisted.tlsrpt.sends}; delivering one
report to its rua endpoints (steps 3 and 4) in L{mtasts_twisted.tlsrpt.rua};
the read-only view of what is not yet sent (C{report preview}) in
L{mtasts_twisted.tlsrpt.pending}.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mtasts_twisted.interfaces import IDNSResolver, IStore
from mtasts_twisted.policy import DomainError
from mtasts_twisted.tlsrpt.aggregate import (
    RESULTS_TABLE,
    decode_results,
    encode_results,
    merge_results,
    results_key,
    split_key,
)
from mtasts_twisted.tlsrpt.mail import SendMail
from mtasts_twisted.tlsrpt.report import (
    DAY_SECONDS,
    Report,
    ReportSettings,
    day_bounds,
    day_of,
    new_unique,
)
from mtasts_twisted.tlsrpt.pending import NoResultsError, PendingReport, pending_reports, preview_report
from mtasts_twisted.tlsrpt.rua import ReportPoster, RuaSender
from mtasts_twisted.tlsrpt.sends import FINAL as _FINAL
from mtasts_twisted.tlsrpt.sends import SENDS_TABLE, TABLES, SendOutcome, SendState

__all__ = [
    "SENDS_TABLE",
    "TABLES",
    "NoResultsError",
    "PendingReport",
    "ReportPoster",
    "ReportScheduler",
    "SchedulerSettings",
    "SendOutcome",
    "SendState",
]

log = Logger()


def _keep_longer(instance: SchedulerSettings, attribute: Any, value: int) -> None:
    if value <= instance.catch_up_days:
        raise ValueError("keep_days must be more than catch_up_days")


@attrs.frozen
class SchedulerSettings:
    """
    When L{ReportScheduler} sends and retries, in seconds unless said
    otherwise.

    @ivar send_delay: seconds after 00:00 UTC to start the daily run;
        L{None} for a random delay in C{[min_delay, max_delay]} per day
        (RFC 8460 §4.1 suggests up to four hours).
    @ivar min_delay: the shortest random delay.
    @ivar max_delay: the longest random delay.
    @ivar retry_base: the first retry delay; it doubles per attempt.
    @ivar retry_max: the longest retry delay.
    @ivar retry_period: seconds after the first attempt to keep retrying
        (RFC 8460 §5.5: "up to 24hrs").
    @ivar lease: how long a claim stays valid without an outcome.
    @ivar catch_up_days: results of days older than this are dropped
        unsent (e.g. after a long outage).
    @ivar keep_days: finished sends rows are kept this many days, so a
        report is never sent twice; more than C{catch_up_days} (else
        L{ValueError}).
    @ivar max_sleep: the longest time between two looks at the store.
    @ivar node: this node's name in claims; random when L{None}.
    """

    send_delay: float | None = None
    min_delay: float = 300.0
    max_delay: float = 14400.0
    retry_base: float = 300.0
    retry_max: float = 4 * 3600.0
    retry_period: float = 86400.0
    lease: float = 3600.0
    catch_up_days: int = 7
    keep_days: int = attrs.field(default=14, validator=_keep_longer)
    max_sleep: float = 3600.0
    node: str | None = None


class ReportScheduler(Service):
    """
    Sends each policy domain one TLSRPT report per UTC day (RFC 8460).

    @ivar settings: the L{ReportSettings}.
    @ivar schedule: the L{SchedulerSettings}.
    @ivar node: this node's name in claims (for logs and the sends rows).
    """

    def __init__(
        self,
        store: IStore,
        settings: ReportSettings,
        resolver: IDNSResolver,
        clock: IReactorTime,
        *,
        schedule: SchedulerSettings = SchedulerSettings(),
        https_sender: ReportPoster | None = None,
        send_mail: SendMail | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param store: holds the L{TABLES} shelves.
        @param settings: report metadata, DKIM, success-only days, on/off.
        @param resolver: looks up C{_smtp._tls} TXT records.
        @param clock: an C{IReactorTime}.
        @param schedule: when to send and retry (L{SchedulerSettings}).
        @param https_sender: delivers to C{https:} rua (an
            L{mtasts_twisted.tlsrpt.https.HTTPSReportSender}); without one
            C{https:} rua are skipped.
        @param send_mail: delivers a mailed report (see
            L{mtasts_twisted.tlsrpt.mail.SendMail}); without one
            C{mailto:} rua are skipped.
        @param rng: randomness for delays, report ids and claims.
        @raise OSError, ValueError: the DKIM key file cannot be read.
        """
        self.settings = settings
        self.schedule = schedule
        self._results = store.shelf(RESULTS_TABLE)
        self._sends = store.shelf(SENDS_TABLE)
        self._clock = clock
        self._rng = rng if rng is not None else random.SystemRandom()
        self._rua = RuaSender(settings, resolver, clock, self._rng, https_sender, send_mail)
        self.node = schedule.node or f"{self._rng.getrandbits(32):08x}"
        self._delays: dict[str, float] = {}
        self._next_wake = schedule.max_sleep
        self._lock = DeferredLock()
        self._timer: IDelayedCall | None = None

    # ------------------------------------------------------------ schedule

    def release_time(self, day: str) -> float:
        """
        When the reports of C{day} are due: the next 00:00 UTC plus the
        delay (RFC 8460 §4.1).

        @param day: C{YYYY-MM-DD}.
        @return: POSIX seconds.
        """
        delay = self.schedule.send_delay
        if delay is None:
            delay = self._delays.get(day)
            if delay is None:
                # RFC 8460 §4.1: "a random delay of up to four hours".
                delay = self._delays[day] = self._rng.uniform(self.schedule.min_delay, self.schedule.max_delay)
        return day_bounds(day)[0] + DAY_SECONDS + delay

    def startService(self) -> None:
        """Look at the store now, then whenever something is due."""
        super().startService()
        if not self.settings.enabled:
            log.info("TLSRPT reports are disabled")
            return
        self._schedule(0)

    def stopService(self) -> Deferred[None]:
        """Stop scheduling; wait for a run under way."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self._lock.run(lambda: None)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(max(delay, 0), self._tick)

    def _tick(self) -> None:
        self._timer = None
        d = self.run_once()

        def failed(failure: Any) -> None:
            log.failure("TLSRPT report run failed; trying again later", failure)

        def again(_: Any) -> None:
            if self.running and self._timer is None:
                self._schedule(self._next_wake)

        d.addErrback(failed).addBoth(again)

    # ------------------------------------------------------------ the run

    def run_once(self, force: bool = False) -> Deferred[list[SendOutcome]]:
        """
        Do everything due now: new reports of past days, due retries,
        clean-up of old rows.

        @param force: ignore the daily delay and retry back-off (what
            C{report send --now} does); claims of other nodes still count.
        @return: L{Deferred} firing with what this node did.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(self._run(force)))

    def send_now(self) -> Deferred[list[SendOutcome]]:
        """
        Send every pending report of past days now (C{report send --now}).

        @return: L{Deferred} firing with what was done; C{[]} when reports
            are disabled.
        """
        if not self.settings.enabled:
            log.warn("TLSRPT reports are disabled: nothing sent")
            return Deferred.fromCoroutine(_nothing())
        return self.run_once(force=True)

    async def _run(self, force: bool) -> list[SendOutcome]:
        now = self._clock.seconds()
        today = day_of(now)
        self._next_wake = self.schedule.max_sleep
        self._wake_at(self.release_time(today), now)
        outcomes: list[SendOutcome] = []
        sends = dict(await self._sends.items())
        for key, value in await self._results.items():
            day, domain = split_key(key)
            if day >= today:
                continue
            try:
                row = sends.get(key)
                if row is not None:
                    if SendState(row["state"]) in _FINAL:
                        # Late results of a finished report: not reported.
                        await self._results.delete(key)
                    continue
                if _days_between(day, today) > self.schedule.catch_up_days:
                    log.warn(
                        "dropping unsent TLSRPT results of {domain} for {day}: older"
                        " than {days} days",
                        domain=domain, day=day, days=self.schedule.catch_up_days,
                    )
                    await self._results.delete(key)
                    continue
                release = self.release_time(day)
                if not force and now < release:
                    self._wake_at(release, now)
                    continue
                outcome = await self._start(day, domain, value)
                if outcome is not None:
                    outcomes.append(outcome)
            except DomainError as e:
                # Not a domain a report can be made for: it will not get
                # better by waiting.
                log.warn("dropping TLSRPT results of {domain!r} for {day}: {error}",
                         domain=domain, day=day, error=str(e))
                await self._results.delete(key)
            except Exception:
                log.failure("TLSRPT report of {domain} for {day} failed", domain=domain, day=day)
        for key, row in sends.items():
            day, domain = split_key(key)
            try:
                state = SendState(row["state"])
                if state in _FINAL:
                    if _days_between(day, today) > self.schedule.keep_days:
                        await self._sends.delete(key)
                    continue
                due = row["next_attempt"] if state is SendState.RETRY else row["lease_until"]
                if (force and state is SendState.RETRY) or now >= due:
                    outcome = await self._resume(key, now, force)
                    if outcome is not None:
                        outcomes.append(outcome)
                else:
                    self._wake_at(due, now)
            except Exception:
                log.failure("TLSRPT report of {domain} for {day} failed", domain=domain, day=day)
        return outcomes

    def _wake_at(self, when: float, now: float) -> None:
        self._next_wake = max(1.0, min(self._next_wake, when - now))

    # ------------------------------------------------------------ one report

    async def _start(self, day: str, domain: str, value: dict[str, Any]) -> SendOutcome | None:
        key = results_key(day, domain)
        results = merge_results(decode_results(value))
        now = self._clock.seconds()
        if not self.settings.report_successes_only_days and not any(r.failures for r in results):
            # Settings: days with only successes are not reported by default.
            def skip(old: dict[str, Any] | None) -> dict[str, Any]:
                return old if old is not None else {"state": SendState.SKIPPED.value, "node": self.node,
                                                    "finished": now}

            await self._sends.update(key, skip)
            await self._results.delete(key)
            log.debug("TLSRPT: {domain} had only successes on {day}: no report", domain=domain, day=day)
            return SendOutcome(day, domain, SendState.SKIPPED)
        unique = new_unique(self._rng.getrandbits)
        # Fail here, before claiming, if the report cannot be made.
        Report.build(self.settings, domain, day, unique, results)
        token = self._token()

        def claim(old: dict[str, Any] | None) -> dict[str, Any] | None:
            # Runs in the database transaction: only one node turns the key
            # from absent into claimed.
            if old is not None:
                return old
            return {
                "state": SendState.SENDING.value,
                "claim": token,
                "node": self.node,
                "lease_until": now + self.schedule.lease,
                "attempts": 1,
                "first_attempt": now,
                "unique": unique,
                **encode_results(results),
            }

        row = await self._sends.update(key, claim)
        if row is None or row.get("claim") != token:
            log.debug("TLSRPT report of {domain} for {day} is another node's", domain=domain, day=day)
            return None
        log.info("claimed TLSRPT report of {domain} for {day}", domain=domain, day=day)
        await self._results.delete(key)
        return await self._attempt(key, row)

    async def _resume(self, key: str, now: float, force: bool) -> SendOutcome | None:
        token = self._token()

        def reclaim(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None:
                return None
            state = SendState(old["state"])
            due = (state is SendState.RETRY and (force or now >= old["next_attempt"])) or (
                state is SendState.SENDING and now >= old["lease_until"]
            )
            if not due:
                return old
            return {
                **old,
                "state": SendState.SENDING.value,
                "claim": token,
                "node": self.node,
                "lease_until": now + self.schedule.lease,
                "attempts": old["attempts"] + 1,
            }

        row = await self._sends.update(key, reclaim)
        if row is None or row.get("claim") != token:
            return None
        return await self._attempt(key, row)

    async def _attempt(self, key: str, row: dict[str, Any]) -> SendOutcome:
        day, domain = split_key(key)
        report = Report.build(self.settings, domain, day, row["unique"], decode_results(row))
        sent = await self._rua.send(report, row["attempts"])
        return await self._finish(key, row, report, sent.state, list(sent.delivered), list(sent.errors))

    async def _finish(
        self, key: str, row: dict[str, Any], report: Report, state: SendState | None,
        delivered: list[str], errors: list[str],
    ) -> SendOutcome:
        day, domain = split_key(key)
        now = self._clock.seconds()
        update: dict[str, Any]
        if state is None:
            delay = min(self.schedule.retry_base * 2 ** (row["attempts"] - 1), self.schedule.retry_max)
            if now + delay > row["first_attempt"] + self.schedule.retry_period:
                # RFC 8460 §5.5: redelivery "for up to 24hrs after the
                # initial attempt", then give up.
                state = SendState.FAILED
                update = {"finished": now}
            else:
                state = SendState.RETRY
                update = {"next_attempt": now + delay}
                self._wake_at(now + delay, now)
        else:
            update = {"finished": now}
        token = row["claim"]
        new_row = {
            **row, **update, "state": state.value, "delivered_to": delivered,
            "last_error": "; ".join(errors) or None,
        }

        def finish(old: dict[str, Any] | None) -> dict[str, Any] | None:
            if old is None or old.get("claim") != token:
                return old  # Our lease ran out and another node took over.
            return new_row

        stored = await self._sends.update(key, finish)
        if stored is None or stored.get("claim") != token:
            log.warn("TLSRPT report {report_id}: lease lost to another node", report_id=report.report_id)
        log.info(
            "TLSRPT report {report_id} of {domain} for {day}: {state} (attempt {attempts})"
            " delivered to {delivered}; errors: {errors}",
            report_id=report.report_id, domain=domain, day=day, state=state.value,
            attempts=row["attempts"], delivered=delivered, errors=errors,
        )
        return SendOutcome(day, domain, state, delivered, errors)

    def _token(self) -> str:
        return f"{self.node}:{self._rng.getrandbits(64):016x}"

    # ------------------------------------------------------------ CLI helpers

    def pending(
        self, day: str | None = None, domain: str | None = None
    ) -> Deferred[list[PendingReport]]:
        """
        List the reports not yet finished (C{report preview} without
        arguments lists these): L{pending_reports}.

        @param day: only this C{YYYY-MM-DD}.
        @param domain: only this policy domain.
        @return: L{Deferred} firing with L{PendingReport}s sorted by day and
            domain.
        """
        return Deferred.fromCoroutine(
            pending_reports(self._results, self._sends, day_of(self._clock.seconds()), day, domain)
        )

    def preview(self, day: str, domain: str) -> Deferred[dict[str, Any]]:
        """
        Return the RFC 8460 JSON that would be (or is being) sent:
        L{preview_report}.

        @param day: C{YYYY-MM-DD}.
        @param domain: the policy domain.
        @return: L{Deferred} firing with the JSON object, or failing with
            L{NoResultsError}.
        """
        return Deferred.fromCoroutine(
            preview_report(self._results, self._sends, self.settings, day, domain, self._rng)
        )


async def _nothing() -> list[SendOutcome]:
    return []


def _days_between(day: str, today: str) -> int:
    return (day_bounds(today)[0] - day_bounds(day)[0]) // DAY_SECONDS

