"""
The MTA-STS policy cache: RFC 8461 §3–§5 semantics over a persistent store.

L{PolicyCache.get} answers "which policy applies to mail for this domain now?"
following the table in DESIGN.md (modelled on the mox mail server's mtastsdb):
backoff after a failed fetch, falling back to a cached policy while it is
valid (downgrade resistance, RFC 8461 §10.2), coalescing of concurrent
lookups, and a hot in-memory front so that a cached answer costs no SQL and,
while the TXT answer's TTL holds, no network.

L{PolicyRefresher} is the service that keeps cached policies fresh (RFC 8461
§10.2 recommends refreshing before expiry) and removes unused entries.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any, AsyncIterator, Callable

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.dns import DNSTemporaryError
from mtasts_twisted.fetch import PolicyFetchError, lookup_sts_answer
from mtasts_twisted.policy import (
    DomainError,
    Mode,
    MTASTSError,
    MultipleRecordsError,
    NoRecordError,
    Policy,
    RecordSyntaxError,
    is_address_literal,
    parse_policy,
    to_alabel,
    to_unicode,
)
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType

log = Logger()

POLICY_TABLE = "policies"
FALLBACK = "+fallback-to-cached-policy"
BACKOFF_REASON = "back-off-after-recent-fetch-error"


class PolicyLookupTemporaryError(MTASTSError):
    """
    The policy could not be determined now and nothing usable is cached:
    retry delivery later.

    @ivar result: the TLSRPT L{Result} of the failed lookup.
    """

    reason = "dns-lookup"

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


@attrs.frozen
class CacheSettings:
    """
    Timings of the policy cache, in seconds.

    @ivar backoff: how long a failed fetch is not retried for the same id.
    @ivar front_size: entries kept in the in-memory front.
    @ivar flush_interval: how often batched C{last_use} times are written.
    @ivar flush_batch: C{last_use} writes in flight at once while flushing
        (so a flush of many domains holds a bounded amount of memory).
    @ivar max_pending_use: domains with a batched C{last_use} that start a
        flush before C{flush_interval} ends.
    """

    backoff: float = 5 * 60
    front_size: int = 10000
    flush_interval: float = 60.0
    flush_batch: int = 256
    max_pending_use: int = 1024


@attrs.frozen
class CacheEntry:
    """
    The cached state of one policy domain (a row of the C{policies} table).

    @ivar domain: the domain in Unicode (the store key).
    @ivar alabel: the domain in A-labels.
    @ivar policy: the cached policy, or L{None} when only a backoff is cached.
    @ivar valid_end: POSIX time until which C{policy} may be used (RFC 8461 §3.2
        C{max_age} after it was last confirmed).
    @ivar backoff_id: the TXT id whose policy fetch last failed, if any.
    @ivar backoff_until: no fetch for C{backoff_id} before this time.
    @ivar backoff_failure: the failure that started the backoff (for reports).
    """

    domain: str
    alabel: str
    inserted: float
    last_update: float
    last_use: float
    record_id: str | None = None
    policy: Policy | None = None
    valid_end: float = 0.0
    backoff_id: str | None = None
    backoff_until: float = 0.0
    backoff_failure: FailureDetails | None = None

    def valid(self, now: float) -> bool:
        """Is there a policy that may still be used at C{now}?"""
        return self.policy is not None and now < self.valid_end

    def in_backoff(self, now: float, record_id: str | None = None) -> bool:
        """Is a fetch (for C{record_id}, when given) backing off at C{now}?"""
        if now >= self.backoff_until:
            return False
        return record_id is None or record_id == self.backoff_id

    def to_json(self) -> dict[str, Any]:
        """The row as stored (JSON, never pickle)."""
        policy = self.policy
        return {
            "domain": self.domain,
            "alabel": self.alabel,
            "inserted": self.inserted,
            "last_update": self.last_update,
            "last_use": self.last_use,
            "record_id": self.record_id,
            "valid_end": self.valid_end,
            "mode": policy.mode.value if policy else None,
            "max_age": policy.max_age if policy else None,
            "mx": list(policy.mx) if policy else None,
            "policy_text": policy.text if policy else None,
            "backoff": self.backoff_until > 0,
            "backoff_id": self.backoff_id,
            "backoff_until": self.backoff_until,
            "backoff_failure": self.backoff_failure.to_json() if self.backoff_failure else None,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CacheEntry:
        """Inverse of L{to_json}; the policy is re-parsed from its raw text."""
        policy = None
        if row.get("policy_text") is not None:
            policy = parse_policy(row["policy_text"])
        failure = row.get("backoff_failure")
        return cls(
            domain=row["domain"],
            alabel=row["alabel"],
            inserted=row["inserted"],
            last_update=row["last_update"],
            last_use=row["last_use"],
            record_id=row.get("record_id"),
            policy=policy,
            valid_end=row.get("valid_end", 0.0),
            backoff_id=row.get("backoff_id"),
            backoff_until=row.get("backoff_until", 0.0),
            backoff_failure=FailureDetails.from_json(failure) if failure else None,
        )


@attrs.frozen
class Lookup:
    """
    The answer of L{PolicyCache.get}.

    @ivar policy: the policy to apply, or L{None} for none.  A policy in mode
        C{none} is returned as such; it asks for no enforcement.
    @ivar result: the TLSRPT result of this lookup (no sessions counted).
    @ivar fresh: C{True} when confirmed by DNS (and HTTPS) now, C{False} when
        served from the cache despite a failure, or backing off.
    @ivar record_id: the TXT id of the policy, when known.
    @ivar entry: the cache entry behind the answer, if any.
    """

    policy: Policy | None
    result: Result
    fresh: bool
    record_id: str | None = None
    entry: CacheEntry | None = None

    def __iter__(self):
        """Unpack as C{(policy, result, fresh)}."""
        return iter((self.policy, self.result, self.fresh))


def describe(alabel: str, policy: Policy | None) -> PolicyDescriptor:
    """The RFC 8460 §4.1 policy object for C{policy} of domain C{alabel}."""
    if policy is None or policy.mode is Mode.NONE:
        return PolicyDescriptor(PolicyType.NO_POLICY_FOUND, alabel)
    return PolicyDescriptor(PolicyType.STS, alabel, policy.policy_strings, policy.mx)


def _failure(result_type: ResultType, reason: str, info: str | None = None) -> FailureDetails:
    return FailureDetails(result_type, failure_reason_code=reason, additional_information=info)


def _classify(error: BaseException) -> FailureDetails:
    """The RFC 8460 failure of a failed TXT lookup or policy fetch."""
    if isinstance(error, PolicyFetchError):
        return _failure(error.result_type, error.reason, str(error)[:200])
    if isinstance(error, MTASTSError):
        return _failure(ResultType.STS_POLICY_FETCH_ERROR, error.reason, str(error)[:200])
    return _failure(ResultType.STS_POLICY_FETCH_ERROR, "internal-error", repr(error)[:200])


class _Front:
    """A bounded LRU dict: the in-memory front of the store."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class PolicyCache:
    """
    The policy cache: L{get} per recipient domain.

    @param store: an L{mtasts_twisted.interfaces.IStore}; its C{policies} table
        holds the entries.
    @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}.
    @param fetcher: has C{fetch(alabel) -> Deferred[FetchedPolicy]} (RFC 8461 §3.3).
    @param clock: an C{IReactorTime}.
    """

    def __init__(self, store, resolver, fetcher, clock, settings: CacheSettings = CacheSettings()) -> None:
        self._shelf = store.shelf(POLICY_TABLE)
        self._resolver = resolver
        self._fetcher = fetcher
        self._clock = clock
        self.settings = settings
        self._front = _Front(settings.front_size)
        self._inflight: dict[str, Deferred] = {}
        self._pending_use: dict[str, float] = {}
        self._early_flush: Deferred[None] | None = None
        # Hot-path memos: normalised names per input, and the TLSRPT result
        # of each cached policy (rebuilt only when the policy changes).
        self._names: dict[str, tuple[str, str]] = {}
        self._described: dict[str, tuple[Policy, Result]] = {}
        # Confirmed answers, reused until the TXT answer's TTL (or the
        # policy's validity) ends: within it, a new TXT lookup could only
        # come from the resolver's own cache and say the same.
        self._confirmed: dict[str, tuple[float, Lookup]] = {}
        self._flusher: LoopingCall | None = None
        self.stats = {"hits": 0, "misses": 0, "fetches": 0, "txt_lookups": 0}

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start writing batched C{last_use} times every C{flush_interval}."""
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = self._clock
        self._flusher.start(self.settings.flush_interval, now=False).addErrback(
            lambda f: log.failure("last_use flusher stopped", f)
        )

    def stop(self) -> Deferred:
        """Stop the flusher and write pending C{last_use} times."""
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        self._flusher = None
        return self.flush()

    def flush(self) -> Deferred:
        """
        Write the batched C{last_use} times (one write per domain, not per
        lookup), at most C{flush_batch} writes in flight at a time: a minute
        of lookups of 50,000 distinct domains must not queue 50,000 store
        operations at once.  A failed write is logged and skipped (the
        time is only used to expire unused entries).
        """
        pending, self._pending_use = self._pending_use, {}
        return Deferred.fromCoroutine(self._flush(pending))

    async def _flush(self, pending: dict[str, float]) -> None:
        def touch(last_use: float) -> Callable[[dict | None], dict | None]:
            def update(row: dict | None) -> dict | None:
                if row is not None and row.get("last_use", 0) < last_use:
                    row = dict(row, last_use=last_use)
                return row

            return update

        items = list(pending.items())
        del pending
        batch = max(1, self.settings.flush_batch)
        failed: list[Any] = []
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            results = await DeferredList(
                [self._shelf.update(domain, touch(t)) for domain, t in chunk], consumeErrors=True
            )
            failed += [(domain, result) for (domain, _), (ok, result) in zip(chunk, results) if not ok]
        if failed:
            # One event per flush, not one per domain (the store may be down).
            log.failure(
                "writing last_use failed for {count} domain(s), e.g. {domain}",
                failed[0][1],
                count=len(failed),
                domain=failed[0][0],
            )

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
        policy is fetched.  A failure keeps the cached policy.
        """
        alabel = to_alabel(domain)
        key = to_unicode(alabel)
        return self._coalesce("refresh:" + key, lambda: self._refresh(key, alabel))

    def _coalesce(self, key: str, start: Callable[[], Any]) -> Deferred:
        """Concurrent callers of one key share one coroutine (and its DNS/HTTPS)."""
        mine: Deferred = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._inflight[key] = waiters = [mine]

        def finish(outcome):
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
        pending = self._pending_use
        pending[entry.domain] = now
        if len(pending) >= self.settings.max_pending_use and self._early_flush is None:
            # Bounded memory between flushes: many distinct domains write
            # early.  (The hot path adds only confirmed domains, at most
            # front_size more.)
            self._early_flush = self.flush()
            self._early_flush.addBoth(self._early_flushed)

    def _early_flushed(self, result: object) -> None:
        self._early_flush = None

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

    async def _txt(self, alabel: str):
        """The STS record of C{alabel} (RFC 8461 §3.1) and its TTL, or the error why not."""
        self.stats["txt_lookups"] += 1
        return await lookup_sts_answer(self._resolver, alabel)

    async def _get(self, key: str, alabel: str) -> Lookup:
        now = self._clock.seconds()
        entry = await self.entry(key)
        if entry is not None and not entry.valid(now) and entry.policy is not None:
            entry = None  # expired: as if nothing were cached
        if entry is not None and entry.policy is None and entry.in_backoff(now):
            # No policy and a recent failed fetch: no lookups at all until it ends.
            self._used(entry, now)
            failure = _failure(ResultType.STS_POLICY_FETCH_ERROR, BACKOFF_REASON)
            return Lookup(None, Result(PolicyDescriptor(PolicyType.STS, alabel), failures=[failure]), False,
                          entry.backoff_id, entry)
        if entry is not None and entry.policy is None:
            entry = None  # a backoff that ended
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
            return Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, alabel),
                                       failures=[_classify(e)]), True)
        except DNSTemporaryError as e:
            result = Result(PolicyDescriptor(PolicyType.STS, alabel), failures=[_classify(e)])
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
            return Lookup(None, Result(PolicyDescriptor(PolicyType.STS, alabel), failures=[failure]),
                          True, record.id, entry)
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
            failure = _classify(e)
            failure = attrs.evolve(failure, failure_reason_code=failure.failure_reason_code + FALLBACK)
            return Lookup(entry.policy, attrs.evolve(cached, failures=[failure]), False,
                          entry.record_id, entry)
        if record.id == entry.record_id:
            self._used(entry, now)
            return self._confirm(Lookup(entry.policy, cached, True, record.id, entry), now, ttl)
        if entry.in_backoff(now, record.id):
            self._used(entry, now)
            failure = entry.backoff_failure or _failure(ResultType.STS_POLICY_FETCH_ERROR, BACKOFF_REASON)
            failure = attrs.evolve(failure, failure_reason_code=(failure.failure_reason_code or "") + FALLBACK)
            return Lookup(entry.policy, attrs.evolve(cached, failures=[failure]), False,
                          entry.record_id, entry)
        try:
            fetched = await self._fetch(alabel)
        except MTASTSError as e:
            failure = _classify(e)
            entry = attrs.evolve(entry, last_use=now, backoff_id=record.id,
                                 backoff_until=now + self.settings.backoff, backoff_failure=failure)
            await self._save(entry)
            log.warn("policy id {record_id} of {domain} cannot be fetched, keeping the cached one: {error}",
                     record_id=record.id, domain=alabel, error=e)
            failure = attrs.evolve(failure, failure_reason_code=failure.failure_reason_code + FALLBACK)
            return Lookup(entry.policy, attrs.evolve(cached, failures=[failure]), False,
                          entry.record_id, entry)
        entry = attrs.evolve(entry, last_update=now, last_use=now, record_id=record.id,
                             policy=fetched.policy, valid_end=now + fetched.policy.max_age,
                             backoff_id=None, backoff_until=0.0, backoff_failure=None)
        await self._save(entry)
        log.info("new policy id {record_id} for {domain}", record_id=record.id, domain=alabel)
        lookup = Lookup(fetched.policy, Result(describe(alabel, fetched.policy)), True, record.id, entry)
        return self._confirm(lookup, now, ttl)

    async def _fetch(self, alabel: str):
        self.stats["fetches"] += 1
        return await self._fetcher.fetch(alabel)

    async def _refresh(self, key: str, alabel: str) -> CacheEntry | None:
        now = self._clock.seconds()
        entry = await self.entry(key)
        if entry is None or entry.policy is None:
            return entry
        try:
            record, _ = await self._txt(alabel)
        except NoRecordError:
            if entry.policy.mode is Mode.NONE:
                # A "none" policy whose TXT record is gone: nothing left to honour.
                await self.delete(key)
                return None
            log.warn("TXT record of {domain} is gone; keeping its cached policy until it expires",
                     domain=alabel)
            return entry
        except MTASTSError as e:
            if entry.policy.mode is not Mode.NONE:
                log.warn("cannot refresh policy of {domain}: {error}", domain=alabel, error=e)
            return entry
        if record.id == entry.record_id:
            entry = attrs.evolve(entry, last_update=now, valid_end=now + entry.policy.max_age)
            await self._save_keep_use(entry)
            return entry
        try:
            fetched = await self._fetch(alabel)
        except MTASTSError as e:
            if entry.policy.mode is not Mode.NONE:
                log.warn("cannot fetch policy id {record_id} of {domain}: {error}",
                         record_id=record.id, domain=alabel, error=e)
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


@attrs.frozen
class RefresherSettings:
    """
    Timings of L{PolicyRefresher}, in seconds.

    @ivar interval: how often a refresh run starts.
    @ivar stale_after: refresh policies not updated for this long.
    @ivar spread: refreshes of one run are spread at random over this window.
    @ivar unused_after: delete entries not used for this long.
    """

    interval: float = 3600.0
    stale_after: float = 12 * 3600.0
    spread: float = 3 * 3600.0
    unused_after: float = 180 * 86400.0


class PolicyRefresher(Service):
    """
    Refresh stale policies and clean up the cache, at start and periodically.

    @param cache: the L{PolicyCache}.
    @param clock: an C{IReactorTime}.
    @param random: a C{random.Random} (injected so tests can fix the spread).
    """

    def __init__(self, cache: PolicyCache, clock, settings: RefresherSettings = RefresherSettings(),
                 rng: random.Random | None = None) -> None:
        self._cache = cache
        self._clock = clock
        self.settings = settings
        self._random = rng or random.Random()
        self._loop: LoopingCall | None = None
        self._scheduled: dict[str, Any] = {}
        self.runs: list[dict[str, int]] = []

    def startService(self) -> None:
        """Start the periodic runs (the first one now)."""
        super().startService()
        self._loop = LoopingCall(self.run)
        self._loop.clock = self._clock
        self._loop.start(self.settings.interval, now=True).addErrback(
            lambda f: log.failure("policy refresher stopped", f)
        )

    def stopService(self) -> None:
        """Stop running and cancel scheduled refreshes."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for call in self._scheduled.values():
            if call.active():
                call.cancel()
        self._scheduled.clear()

    def run(self) -> Deferred:
        """One run: delete unused entries, schedule refreshes of stale ones."""
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> dict[str, int]:
        now = self._clock.seconds()
        summary = {"entries": 0, "deleted": 0, "scheduled": 0}
        async for page in self._cache.entry_pages():
            for entry in page:
                await self._visit(entry, now, summary)
        self.runs.append(summary)
        log.info("policy refresher: {entries} entries, {deleted} deleted, {scheduled} refreshes scheduled",
                 **summary)
        return summary

    async def _visit(self, entry: CacheEntry, now: float, summary: dict[str, int]) -> None:
        """Delete C{entry} if unused or an ended backoff; schedule its refresh if stale."""
        summary["entries"] += 1
        if now - entry.last_use > self.settings.unused_after:
            await self._cache.delete(entry.domain)
            summary["deleted"] += 1
        elif entry.policy is None:
            if not entry.in_backoff(now):
                await self._cache.delete(entry.domain)  # a backoff that ended
                summary["deleted"] += 1
        elif now - entry.last_update >= self.settings.stale_after and entry.domain not in self._scheduled:
            delay = self._random.uniform(0, self.settings.spread)
            self._scheduled[entry.domain] = self._clock.callLater(delay, self._refresh, entry.domain)
            summary["scheduled"] += 1

    def _refresh(self, domain: str) -> Deferred:
        self._scheduled.pop(domain, None)
        d = self._cache.refresh(domain)
        d.addErrback(lambda f: log.failure("refresh of {domain} failed", f, domain=domain))
        return d
