"""
The MTA-STS policy cache: RFC 8461 §3–§5 semantics over a persistent store.

L{PolicyCache.get} answers "which policy applies to mail for this domain now?"
following the table in docs/design.rst (modelled on the mox mail server's
mtastsdb): backoff after a failed fetch, falling back to a cached policy while
it is valid (downgrade resistance, RFC 8461 §10.2), coalescing of concurrent
lookups, and a hot in-memory front so that a cached answer costs no SQL and,
while the TXT answer's TTL holds, no network.  Last-use times are batched
and written by L{PolicyCache.flush}.
"""

from __future__ import annotations

import collections
import time
from typing import Any, AsyncIterator, Callable, Coroutine, Optional, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.cache.entry import POLICY_TABLE, CacheEntry
from mtasts_twisted.cache.front import _Front
from mtasts_twisted.cache.lookup import Lookup, PolicyLookupTemporaryError, _backoff_text, backoff_lookup, usable_entry
from mtasts_twisted.cache.reporting import (
    BACKOFF_REASON,
    _classify,
    _fallback,
    _failure,
    describe,
    lookup_problem,
    lookup_stopped,
)
from mtasts_twisted.cache.settings import CacheSettings
from mtasts_twisted.cache.usage import UseTimes
from mtasts_twisted.dns import DNSTemporaryError
from mtasts_twisted.dns.records import lookup_sts_answer
from mtasts_twisted.fetch import FetchedPolicy
from mtasts_twisted.interfaces import IDNSResolver, IPolicyFetcher, IStore
from mtasts_twisted.periodic import Periodic
from mtasts_twisted.policy import (
    DomainError,
    Mode,
    MTASTSError,
    MultipleRecordsError,
    NoRecordError,
    Policy,
    RecordSyntaxError,
    STSRecord,
    is_address_literal,
    to_alabel,
    to_unicode,
)
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result, ResultType

__all__ = ["PolicyCache"]


# The package is the log namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.cache")

_T = TypeVar("_T")


class PolicyCache:
    """
    The policy cache: L{get} per recipient domain.

    @param store: an L{mtasts_twisted.interfaces.IStore}; its C{policies} table
        holds the entries.
    @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}, or L{None}
        for a cache only listed and purged (the CLI's C{cache} command).
    @param fetcher: has C{fetch(alabel) -> Deferred[FetchedPolicy]} (RFC 8461
        §3.3); L{None} as for C{resolver}.
    @param clock: an C{IReactorTime}.
    """

    def __init__(self, store: IStore, resolver: Optional[IDNSResolver], fetcher: Optional[IPolicyFetcher],
                 clock: IReactorTime, settings: CacheSettings = CacheSettings()) -> None:
        self._shelf = store.shelf(POLICY_TABLE)
        self._resolver = resolver
        self._fetcher = fetcher
        self._clock = clock
        self.settings = settings
        self._front = _Front(settings.front_size)
        self._inflight: dict[str, list[Deferred[Any]]] = {}
        # Batched last_use times; the hot path writes the dict directly.
        self._uses = UseTimes(self._shelf, settings)
        self._pending_use = self._uses.pending
        # Hot-path memos: normalised names per input, and the TLSRPT result
        # of each cached policy (rebuilt only when the policy changes).
        self._names: dict[str, tuple[str, str]] = {}
        self._described: dict[str, tuple[Optional[Policy], Result]] = {}
        # Confirmed answers, reused until the TXT answer's TTL (or the
        # policy's validity) ends: within it, a new TXT lookup could only
        # come from the resolver's own cache and say the same.
        self._confirmed: dict[str, tuple[float, Lookup]] = {}
        self._flusher: Periodic | None = None
        self.stats = {"hits": 0, "misses": 0, "fetches": 0, "txt_lookups": 0}
        #: Failed refreshes of policies in mode enforce or testing, by
        #: reason code (the C{mtasts_policy_refresh_failures_total} metric);
        #: each is also logged as "policy refresh failed".
        self.refresh_failures: collections.Counter[str] = collections.Counter()

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """
        Start writing batched C{last_use} times every C{flush_interval}; a
        flush that fails is logged and the flushes go on (L{Periodic}).
        """
        self._flusher = Periodic("last_use flush", self.flush, self.settings.flush_interval, self._clock)
        self._flusher.start(now=False)

    def stop(self) -> Deferred[None]:
        """Stop the flusher and write pending C{last_use} times."""
        if self._flusher is not None:
            self._flusher.stop()
        self._flusher = None
        return self.flush()

    def flush(self) -> Deferred[None]:
        """Write the batched C{last_use} times now (L{UseTimes.flush})."""
        return self._uses.flush()

    # --- lookups ------------------------------------------------------------------

    def get(self, domain: str) -> Deferred[Lookup]:
        """
        Find the policy for mail to C{domain} (the recipient domain, RFC 8461 §4).

        @return: L{Deferred} firing with a L{Lookup} (which also unpacks as
            C{(policy, result, fresh)}), or failing with
            L{PolicyLookupTemporaryError} when the TXT lookup failed
            temporarily and no valid policy is cached, or L{DomainError}
            when C{domain} is not a domain name.
        """
        names = self._names.get(domain)
        if names is None:
            if is_address_literal(domain):
                # Address literals have no policy domain.
                result = Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain.strip()))
                return succeed(Lookup(None, result, True))
            try:
                names = (to_alabel(domain), to_unicode(domain))
            except DomainError as e:
                return fail(e)
            if len(self._names) >= self.settings.front_size:
                self._names.clear()
            self._names[domain] = names
        alabel, key = names
        confirmed = self._confirmed.get(key)
        if confirmed is not None:
            now = self._clock.seconds()
            if now < confirmed[0]:
                self.stats["hits"] += 1
                self._pending_use[key] = now
                return succeed(confirmed[1])
            del self._confirmed[key]
        return self._coalesce(key, lambda: self._get(key, alabel))

    async def peek(self, domain: str) -> Lookup | None:
        """
        What L{get} would answer from the cache alone (no DNS, no fetch,
        nothing counted; the status page): the confirmed answer while its
        TXT TTL holds, else a valid policy as if its id were confirmed
        again (C{fresh} false) or the backoff in force; L{None} when L{get}
        would look C{domain} up.  Raises L{DomainError} for a non-domain.
        """
        alabel, key = to_alabel(domain), to_unicode(domain)
        now = self._clock.seconds()
        confirmed = self._confirmed.get(key)
        if confirmed is not None and now < confirmed[0]:
            return confirmed[1]
        entry = usable_entry(await self.entry(key), now)
        if entry is None:
            return None
        if entry.policy is None:
            return backoff_lookup(entry)
        return Lookup(entry.policy, self._describe(alabel, entry), False, entry.record_id, entry)

    def _confirm(self, lookup: Lookup, now: float, ttl: int) -> Lookup:
        """Remember a lookup confirmed by DNS now, while its TXT answer holds."""
        entry = lookup.entry
        if entry is not None and ttl > 0:
            if len(self._confirmed) >= self.settings.front_size:
                self._confirmed.clear()
            self._confirmed[entry.domain] = (min(now + ttl, entry.valid_end), lookup)
        return lookup

    def refresh(self, domain: str) -> Deferred[CacheEntry | None]:
        """
        Refresh the cached policy of C{domain} now (used by the refresher).

        Same TXT id: the validity is extended without HTTPS.  New id: the
        policy is fetched.  A failure keeps the cached policy, and is an
        alert for the operator (L{refresh_failures}, and a warning
        "policy refresh failed for DOMAIN (REASON): ..."), unless the
        policy is in mode C{none} (it protects nothing).  An unexpected
        error (e.g. the store is down) is counted as C{internal-error} and
        fails the L{Deferred}.
        """
        alabel = to_alabel(domain)
        key = to_unicode(alabel)
        d = self._coalesce("refresh:" + key, lambda: self._refresh(key, alabel))

        def failed(failure: Failure) -> Failure:
            self.refresh_failures["internal-error"] += 1
            return failure

        return d.addErrback(failed)

    def _refresh_failed(self, entry: CacheEntry, reason: str, error: object) -> None:
        """Alert the operator: a refresh of C{entry}'s policy failed with C{reason}."""
        policy = entry.policy
        if policy is None or policy.mode is Mode.NONE:
            log.debug("refresh of the mode none policy of {domain} failed ({reason}): {error}",
                      domain=entry.alabel, reason=reason, error=error)
            return
        self.refresh_failures[reason] += 1
        log.warn(
            "policy refresh failed for {domain} ({reason}): {error}; the cached {mode} policy (id {record_id})"
            " stays in use until {valid_until}",
            domain=entry.alabel,
            reason=reason,
            error=str(error),
            mode=policy.mode.value,
            record_id=entry.record_id,
            valid_until=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.valid_end)),
        )

    def _coalesce(self, key: str, start: Callable[[], Coroutine[Any, Any, _T]]) -> Deferred[_T]:
        """Concurrent callers of one key share one coroutine (and its DNS/HTTPS)."""
        mine: Deferred[_T] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._inflight[key] = waiters = [mine]

        def finish(outcome: _T | Failure) -> None:
            del self._inflight[key]
            for waiter in waiters:
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)

        Deferred.fromCoroutine(start()).addBoth(finish)
        return mine

    async def entry(self, key: str) -> CacheEntry | None:
        """The cache entry of C{key} (Unicode domain): front first, then the store."""
        entry = self._front.get(key)
        if entry is not None:
            return entry
        row = await self._shelf.get(key)
        if row is None:
            return None
        try:
            entry = CacheEntry.from_json(row)
        except (KeyError, TypeError, ValueError, MTASTSError) as e:
            log.warn("ignoring unreadable cache entry for {domain}: {error}", domain=key, error=e)
            return None
        self._front.put(key, entry)
        return entry

    async def _save(self, entry: CacheEntry) -> None:
        self._confirmed.pop(entry.domain, None)
        self._front.put(entry.domain, entry)
        self._pending_use.pop(entry.domain, None)
        await self._shelf.put(entry.domain, entry.to_json())

    def _used(self, entry: CacheEntry, now: float) -> None:
        # Batched: the store and entries() see it; the front entry need not.
        self._uses.note(entry.domain, now)

    def _describe(self, alabel: str, entry: CacheEntry) -> Result:
        """The lookup result of a cached policy, memoised per policy."""
        memo = self._described.get(entry.domain)
        if memo is not None and memo[0] is entry.policy:
            return memo[1]
        result = Result(describe(alabel, entry.policy))
        if len(self._described) >= self.settings.front_size:
            self._described.clear()
        self._described[entry.domain] = (entry.policy, result)
        return result

    async def _txt(self, alabel: str) -> tuple[STSRecord, int]:
        """The STS record of C{alabel} (RFC 8461 §3.1) and its TTL, or the error why not."""
        self.stats["txt_lookups"] += 1
        # Only the CLI's cache commands make a cache without a resolver, and
        # they never look a policy up.
        assert self._resolver is not None
        return await lookup_sts_answer(self._resolver, alabel)

    async def _get(self, key: str, alabel: str) -> Lookup:
        now = self._clock.seconds()
        # An ended policy or backoff: as if nothing were cached.
        entry = usable_entry(await self.entry(key), now)
        if entry is not None and entry.policy is None:
            # No policy and a recent failed fetch: no lookups at all until it ends.
            self._used(entry, now)
            return backoff_lookup(entry)
        if entry is None:
            self.stats["misses"] += 1
            return await self._discover(key, alabel, now)
        self.stats["hits"] += 1
        return await self._revalidate(entry, alabel, now)

    async def _discover(self, key: str, alabel: str, now: float) -> Lookup:
        """Nothing valid cached: TXT lookup, then fetch."""
        try:
            record, ttl = await self._txt(alabel)
        except NoRecordError:
            return Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, alabel)), True)
        except (MultipleRecordsError, RecordSyntaxError) as e:
            return Lookup(None, lookup_problem(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, alabel),
                                               _classify(e)), True, error=str(e))
        except DNSTemporaryError as e:
            # The one lookup problem that stops delivery: the mail is deferred.
            result = lookup_stopped(PolicyDescriptor(PolicyType.STS, alabel), _classify(e))
            raise PolicyLookupTemporaryError(f"MTA-STS TXT lookup for {alabel} failed: {e}", result) from e
        try:
            fetched = await self._fetch(alabel)
        except MTASTSError as e:
            failure = _classify(e)
            entry = CacheEntry(domain=key, alabel=alabel, inserted=now, last_update=now, last_use=now,
                               backoff_id=record.id, backoff_until=now + self.settings.backoff,
                               backoff_failure=failure)
            await self._save(entry)
            log.info("no usable policy for {domain} (id {record_id}): {error}",
                     domain=alabel, record_id=record.id, error=e)
            return Lookup(None, lookup_problem(PolicyDescriptor(PolicyType.STS, alabel), failure),
                          True, record.id, entry, error=str(e))
        entry = CacheEntry(domain=key, alabel=alabel, inserted=now, last_update=now, last_use=now,
                           record_id=record.id, policy=fetched.policy,
                           valid_end=now + fetched.policy.max_age)
        await self._save(entry)
        lookup = Lookup(fetched.policy, Result(describe(alabel, fetched.policy)), True, record.id, entry)
        return self._confirm(lookup, now, ttl)

    async def _revalidate(self, entry: CacheEntry, alabel: str, now: float) -> Lookup:
        """A valid policy is cached: check the TXT id (RFC 8461 §5.1)."""
        cached = self._describe(alabel, entry)
        try:
            record, ttl = await self._txt(alabel)
        except (NoRecordError, MultipleRecordsError, RecordSyntaxError, DNSTemporaryError) as e:
            # RFC 8461 §10.2 downgrade resistance: keep the cached policy until it expires.
            self._used(entry, now)
            failure = _fallback(_classify(e))
            return Lookup(entry.policy, lookup_problem(cached.policy, failure), False,
                          entry.record_id, entry, error=str(e))
        if record.id == entry.record_id:
            self._used(entry, now)
            return self._confirm(Lookup(entry.policy, cached, True, record.id, entry), now, ttl)
        if entry.in_backoff(now, record.id):
            self._used(entry, now)
            failure = _fallback(entry.backoff_failure or _failure(ResultType.STS_POLICY_FETCH_ERROR, BACKOFF_REASON))
            return Lookup(entry.policy, lookup_problem(cached.policy, failure), False,
                          entry.record_id, entry, error=_backoff_text(entry.backoff_failure))
        try:
            fetched = await self._fetch(alabel)
        except MTASTSError as e:
            failure = _classify(e)
            entry = attrs.evolve(entry, last_use=now, backoff_id=record.id,
                                 backoff_until=now + self.settings.backoff, backoff_failure=failure)
            await self._save(entry)
            log.warn("policy id {record_id} of {domain} cannot be fetched, keeping the cached one: {error}",
                     record_id=record.id, domain=alabel, error=e)
            return Lookup(entry.policy, lookup_problem(cached.policy, _fallback(failure)), False,
                          entry.record_id, entry, error=str(e))
        entry = attrs.evolve(entry, last_update=now, last_use=now, record_id=record.id,
                             policy=fetched.policy, valid_end=now + fetched.policy.max_age,
                             backoff_id=None, backoff_until=0.0, backoff_failure=None)
        await self._save(entry)
        log.info("new policy id {record_id} for {domain}", record_id=record.id, domain=alabel)
        lookup = Lookup(fetched.policy, Result(describe(alabel, fetched.policy)), True, record.id, entry)
        return self._confirm(lookup, now, ttl)

    async def _fetch(self, alabel: str) -> FetchedPolicy:
        self.stats["fetches"] += 1
        assert self._fetcher is not None, "this PolicyCache was made without a fetcher"
        return await self._fetcher.fetch(alabel)

    async def _refresh(self, key: str, alabel: str) -> CacheEntry | None:
        now = self._clock.seconds()
        entry = await self.entry(key)
        if entry is None or entry.policy is None:
            return entry
        policy = entry.policy
        try:
            record, _ = await self._txt(alabel)
        except NoRecordError:
            if policy.mode is Mode.NONE:
                # A "none" policy whose TXT record is gone: nothing left to honour.
                await self.delete(key)
                return None
            self._refresh_failed(entry, NoRecordError.reason, f"the TXT record _mta-sts.{alabel} is gone")
            return entry
        except MTASTSError as e:
            self._refresh_failed(entry, e.reason, e)
            return entry
        if record.id == entry.record_id:
            entry = attrs.evolve(entry, last_update=now, valid_end=now + policy.max_age)
            await self._save_keep_use(entry)
            return entry
        try:
            fetched = await self._fetch(alabel)
        except MTASTSError as e:
            self._refresh_failed(entry, e.reason, f"cannot fetch policy id {record.id}: {e}")
            entry = attrs.evolve(entry, backoff_id=record.id, backoff_until=now + self.settings.backoff,
                                 backoff_failure=_classify(e))
            await self._save_keep_use(entry)
            return entry
        entry = attrs.evolve(entry, last_update=now, record_id=record.id, policy=fetched.policy,
                             valid_end=now + fetched.policy.max_age, backoff_id=None,
                             backoff_until=0.0, backoff_failure=None)
        await self._save_keep_use(entry)
        return entry

    async def _save_keep_use(self, entry: CacheEntry) -> None:
        """Save without losing a batched, not yet written C{last_use}."""
        pending = self._pending_use.get(entry.domain)
        if pending is not None and pending > entry.last_use:
            entry = attrs.evolve(entry, last_use=pending)
        await self._save(entry)

    async def delete(self, domain: str) -> bool:
        """Forget C{domain} (Unicode or A-label); return whether it was cached."""
        key = to_unicode(domain)
        self._front.pop(key)
        self._pending_use.pop(key, None)
        self._described.pop(key, None)
        self._confirmed.pop(key, None)
        return bool(await self._shelf.delete(key))

    async def entry_pages(self, size: int = 500) -> AsyncIterator[list[CacheEntry]]:
        """
        Every readable cache entry, in key order, a page at a time: the
        refresher walks a cache of any size without loading all of it.
        """
        after = None
        while True:
            rows = await self._shelf.items(after=after, limit=size)
            page = []
            for key, row in rows:
                try:
                    entry = CacheEntry.from_json(row)
                except (KeyError, TypeError, ValueError, MTASTSError) as e:
                    log.warn("ignoring unreadable cache entry for {domain}: {error}", domain=key, error=e)
                    continue
                if self._pending_use.get(key, 0) > entry.last_use:
                    entry = attrs.evolve(entry, last_use=self._pending_use[key])
                page.append(entry)
            if page:
                yield page
            if len(rows) < size:
                return
            after = rows[-1][0]

    async def entries(self) -> list[CacheEntry]:
        """Every readable cache entry, in key order (for the CLI)."""
        return [entry async for page in self.entry_pages() for entry in page]
