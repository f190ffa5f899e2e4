"""
The socketmap server: L{SocketmapFactory} answers each request from the
MTA-STS policy cache (and, for a wildcard policy, the domain's MX hosts),
memoises the rendered answers, counts them, and admits connections within
the caps (L{admission<mtasts_twisted.socketmap.admission>} picks the
connection that makes room).

With C{SocketmapSettings.dane}, an answer that would set a TLS level
waits for the next hop's DANE verdict (L{mtasts_twisted.socketmap.dane})
and is memoised for its TTL like the others.

Every lookup's TLSRPT result goes to the optional L{IResultSink}; Postfix
records the delivery itself.  The hot path of a cached answer is: the frame
cut from the input, a dict hit for the parsed key, L{PolicyCache.get
<mtasts_twisted.cache.PolicyCache.get>} (whose already-fired L{Deferred} is
read by L{result_now} without adding callbacks), a dict hit for the rendered
answer, one C{send} on the socket (L{ImmediateWriter
<mtasts_twisted.socketmap.protocol.ImmediateWriter>}).  Nothing is logged
per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from mtasts_twisted.cache import Lookup, PolicyLookupTemporaryError
from mtasts_twisted.dns import DNSNoRecordError, MXAnswer
from mtasts_twisted.interfaces import IDNSResolver, IResultSink
from mtasts_twisted.policy import DomainError, Policy
from mtasts_twisted.socketmap.admission import ConnectionTable
from mtasts_twisted.socketmap.dane import DomainDANE, NextHopDANE, dane_reply, next_hop_dane
from mtasts_twisted.socketmap.answers import (
    ANSWER_KINDS,
    NOTFOUND,
    answer_kind,
    answer_settings,
    fixed_answer,
    needs_mx_hosts,
    policy_has_wildcard,
    render_answer,
    render_failure,
)
from mtasts_twisted.socketmap.deferreds import PENDING, result_now
from mtasts_twisted.socketmap.netstring import encode_netstring
from mtasts_twisted.socketmap.protocol import SocketmapProtocol
from mtasts_twisted.socketmap.request import MalformedRequestError, ParsedKey, parse_key, parse_request
from mtasts_twisted.socketmap.settings import DEFAULT_SETTINGS, SocketmapSettings
from mtasts_twisted.store import StoreError

__all__ = ["CONNECTION_EVENTS", "EVICTING", "Counter", "PolicySource", "SocketmapFactory"]

log = Logger()

#: Connection events also counted in L{SocketmapFactory.counts}.
CONNECTION_EVENTS = ("broken", "idle", "evicted", "refused")

#: Connections closed to make room that may be still closing (their sockets
#: go on the next reactor turn): beyond this many, a new connection over a
#: cap is refused, so at most C{max_connections + EVICTING} sockets are open.
EVICTING = 32

_INF = float("inf")


class PolicySource(TypingProtocol):
    """What the server needs from the policy cache: L{PolicyCache.get<mtasts_twisted.cache.PolicyCache.get>}."""

    def get(self, domain: str) -> Deferred[Lookup]:
        """Fire with the L{Lookup} for mail to C{domain}; fail as L{PolicyCache.get} does."""


class _CounterChild(TypingProtocol):
    def inc(self) -> None: ...


class Counter(TypingProtocol):
    """
    The part of a C{prometheus_client.Counter} (declared with
    C{labelnames=["answer"]}) that the server uses.
    """

    def labels(self, *, answer: str) -> _CounterChild:
        """The child counter of one answer kind."""


def _frame(text: str) -> bytes:
    return encode_netstring(text.encode("utf-8"))


_NOTFOUND = _frame(NOTFOUND)
_NOTFOUND_ANSWER = ("notfound", _NOTFOUND)


def _evict(table: dict, size: int) -> None:
    """Bound C{table} to C{size} entries, oldest insertion first (no LRU bookkeeping on hits)."""
    while len(table) >= size > 0:
        del table[next(iter(table))]


class SocketmapFactory(Factory):
    """
    Serves Postfix C{smtp_tls_policy_maps} socketmap lookups from a
    L{PolicyCache<mtasts_twisted.cache.PolicyCache>}.

    @ivar settings: the L{SocketmapSettings}.
    @ivar clock: the C{IReactorTime} for idle timeouts and MX answer expiry.
    @ivar connections: connections open now (including those closed to make
        room whose sockets are still closing).
    @ivar counts: requests by answer kind (L{ANSWER_KINDS}) and connection
        events (C{broken}: closed on a broken netstring; C{idle}: closed
        after the idle or first-request timeout; C{evicted}: closed to make
        room at a cap; C{refused}: closed on accept, over a cap with no
        connection to close).  A plain dict, cheap to update and to read
        from a metrics collector.
    """

    protocol = SocketmapProtocol
    noisy = False

    def __init__(
        self,
        cache: PolicySource,
        resolver: IDNSResolver,
        clock: IReactorTime,
        settings: SocketmapSettings = DEFAULT_SETTINGS,
        sink: IResultSink | None = None,
        metrics: Counter | None = None,
    ) -> None:
        """
        @param cache: a L{PolicyCache<mtasts_twisted.cache.PolicyCache>} (or
            anything with its C{get(domain) -> Deferred[Lookup]}).
        @param resolver: an L{IDNSResolver<mtasts_twisted.interfaces.IDNSResolver>}
            for the MX lookups (its answer cache honours TTLs).
        @param clock: an C{IReactorTime}.
        @param settings: the L{SocketmapSettings}.
        @param sink: an optional L{IResultSink<mtasts_twisted.interfaces.IResultSink>}
            receiving every lookup's TLSRPT result.
        @param metrics: an optional C{prometheus_client.Counter} declared with
            C{labelnames=["answer"]} (in any registry; none is imported
            here): incremented per request with the answer kind.
        """
        self._cache = cache
        self._resolver = resolver
        self.clock = clock
        self.settings = settings
        self._sink = sink
        self.connections = 0
        self.counts: dict[str, int] = dict.fromkeys(ANSWER_KINDS + CONNECTION_EVENTS, 0)
        self._table = ConnectionTable()
        self._evicting: set[SocketmapProtocol] = set()
        self._children: dict[str, _CounterChild] | None = None
        if metrics is not None:
            self._children = {kind: metrics.labels(answer=kind) for kind in ANSWER_KINDS}
        self._names = (
            None if settings.map_names is None else frozenset(n.encode("utf-8") for n in settings.map_names)
        )
        # request payload -> ParsedKey, or (kind, frame) of an immediate answer
        self._requests: dict[bytes, ParsedKey | tuple[str, bytes]] = {}
        # memo key -> (policy, record_id, expires, kind, frame)
        self._memo: dict[str, tuple[Policy, str | None, float, str, bytes]] = {}

    def buildProtocol(self, addr: IAddress | None) -> SocketmapProtocol | None:
        """
        A protocol for a new connection from C{addr}, within the caps.

        Over C{max_connections_per_client} (for C{addr}'s IP address) or
        C{max_connections}, an idle connection of that client (or of any
        client) is closed to make room (see L{admission
        <mtasts_twisted.socketmap.admission>}); when there is none, or
        L{EVICTING} are still closing, the new connection is refused: L{None}
        (Twisted closes it).
        """
        client: str | None = getattr(addr, "host", None)  # IPv4Address, IPv6Address; not UNIXAddress
        settings = self.settings
        table = self._table
        per_client = settings.max_connections_per_client
        if client is not None and per_client is not None and table.count(client) >= per_client:
            if not self._make_room(client):
                return None
        limit = settings.max_connections
        if limit is not None and len(table) >= limit:
            if not self._make_room(None):
                return None
        return SocketmapProtocol(self, client)

    def _make_room(self, client: str | None) -> bool:
        victim = None if len(self._evicting) >= EVICTING else self._table.victim(client)
        if victim is None:
            self.counts["refused"] += 1
            return False
        assert isinstance(victim, SocketmapProtocol)
        self._table.remove(victim)
        self._evicting.add(victim)
        self.counts["evicted"] += 1
        victim.abort()
        return True

    # --- connection bookkeeping (called by SocketmapProtocol) --------------------------

    def connection_opened(self, connection: SocketmapProtocol) -> None:
        """Count a new connection."""
        self.connections += 1
        self._table.add(connection)

    def connection_active(self, connection: SocketmapProtocol) -> None:
        """C{connection} has sent its first complete request."""
        self._table.activate(connection)

    def connection_closed(self, connection: SocketmapProtocol) -> None:
        """Uncount a closed connection."""
        self.connections -= 1
        self._table.remove(connection)
        self._evicting.discard(connection)

    def memoised(self, key: str, lookup: Lookup) -> tuple[str, float] | None:
        """
        The answer memoised for C{key} (a domain in A-labels, or C{[host]})
        and C{lookup}'s policy and id, with when it expires, while it
        holds; else L{None}.  Nothing is looked up or counted (the status
        page shows it).
        """
        memo = self._memo.get(key)
        if memo is None or memo[0] != lookup.policy or memo[1] != lookup.record_id:
            return None
        if memo[2] <= self.clock.seconds():
            return None
        # The frame is "LENGTH:TEXT," (encode_netstring).
        return memo[4].partition(b":")[2][:-1].decode("utf-8"), memo[2]

    # --- per request ---------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        if self._children is not None:
            self._children[kind].inc()

    def respond(self, request: bytes) -> bytes | Deferred[bytes]:
        """
        Answer one request payload.

        @return: the framed answer, or a L{Deferred} firing with it (never
            failing) when a lookup is in flight.
        """
        parsed = self._requests.get(request)
        if parsed is None:
            parsed = self._parse(request)
        if isinstance(parsed, tuple):
            self._count(parsed[0])
            return parsed[1]
        try:
            d = self._cache.get(parsed.domain)  # type: ignore[arg-type]
            # A hot cache answer has fired already: take it without a callback.
            result = result_now(d)
            if type(result) is Lookup:
                answer = self._answer(result, parsed)
                if isinstance(answer, bytes):
                    return answer
                return answer.addErrback(self._internal_error, parsed)
            if isinstance(result, Failure):
                return self._failed(result, parsed)
        except Exception:  # noqa: BLE001 - one bad answer must not stall the connection
            return self._internal_error(Failure(), parsed)
        return d.addCallbacks(self._answer, self._failed, callbackArgs=(parsed,), errbackArgs=(parsed,)).addErrback(
            self._internal_error, parsed
        )

    def _parse(self, request: bytes) -> ParsedKey | tuple[str, bytes]:
        parsed: ParsedKey | tuple[str, bytes]
        try:
            name, key = parse_request(request)
            if self._names is not None and request.partition(b" ")[0] not in self._names:
                raise MalformedRequestError(f"unknown map name {name[:40]!r}")
            parsed = parse_key(key)
        except MalformedRequestError as e:
            parsed = ("perm", _frame("PERM " + str(e)[:200]))
        else:
            if parsed.domain is None:
                parsed = _NOTFOUND_ANSWER
        _evict(self._requests, self.settings.memo_size)
        self._requests[request] = parsed
        return parsed

    def _answer(self, lookup: Lookup, parsed: ParsedKey) -> bytes | Deferred[bytes]:
        sink = self._sink
        if sink is not None:
            sink.record(lookup.result)
        fixed = fixed_answer(lookup, self.settings)
        if fixed is not None:
            if fixed == NOTFOUND:
                self._count("notfound")
                return _NOTFOUND
            self._count(answer_kind(fixed))
            return _frame(fixed)
        policy: Policy = lookup.policy  # type: ignore[assignment]
        domain: str = parsed.domain  # type: ignore[assignment]
        key = "[" + domain + "]" if parsed.bracketed else domain
        memo = self._memo.get(key)
        if (
            memo is not None
            and memo[0] is policy
            and memo[1] == lookup.record_id
            and memo[2] > self.clock.seconds()
        ):
            self._count(memo[3])
            return memo[4]
        if self.settings.dane:
            # Never override DANE: its verdict before the MTA-STS answer.
            found = next_hop_dane(self._resolver, domain, bracketed=parsed.bracketed)
            now = result_now(found)
            if now is PENDING:
                return found.addCallback(self._dane_answered, key, domain, lookup, parsed.bracketed)
            if isinstance(now, Failure):
                now.raiseException()
            return self._dane_answered(now, key, domain, lookup, parsed.bracketed)
        if parsed.bracketed:
            # Postfix connects to a [host] next hop itself: no MX lookup.
            return self._render(key, domain, lookup, (domain,), _INF)
        if not needs_mx_hosts(policy, self.settings):
            # Exact patterns only: the match list is the patterns themselves,
            # as safe as any MX-derived list (Postfix verifies the MX host's
            # certificate against it), so no MX query is needed.  (A testing
            # policy answered with attributes lists no MX host at all.)
            return self._render(key, domain, lookup, None, _INF)
        d = self._resolver.lookup_mx(domain)
        result = result_now(d)
        if result is PENDING:
            return d.addBoth(self._mx_answered, key, domain, lookup)
        return self._mx_answered(result, key, domain, lookup)

    def _mx_answered(self, result: object, key: str, domain: str, lookup: Lookup) -> bytes:
        now = self.clock.seconds()
        hosts: tuple[str, ...] | None
        if isinstance(result, MXAnswer):
            hosts = tuple(mx.host for mx in result.hosts)
            expires = now + max(result.ttl, 0)
        elif isinstance(result, Failure) and result.check(DNSNoRecordError):
            hosts = ()  # no MX and no address: nothing can match
            expires = now + self.settings.mx_retry
        else:
            error = result.value if isinstance(result, Failure) else result
            log.warn(  # noqa: G010 - twisted.logger has no warning()
                "MX lookup of {domain} failed ({error}); answering with the policy's patterns, "
                "which let Postfix accept MX hosts at any depth below a wildcard",
                domain=domain,
                error=error,
            )
            hosts = None
            expires = now + self.settings.mx_retry
        return self._render(key, domain, lookup, hosts, expires)

    def _dane_answered(self, found: DomainDANE, key: str, domain: str, lookup: Lookup, bracketed: bool) -> bytes:
        """The answer once the next hop's DANE verdict is known (C{settings.dane})."""
        settings = self.settings
        now = self.clock.seconds()
        if found.verdict is NextHopDANE.FAILED:
            expires = now + settings.mx_retry
        else:
            expires = now + min(max(found.ttl, 0), settings.dane_max_age)
        text = dane_reply(domain, found)
        if text is not None:
            if found.verdict is NextHopDANE.FAILED:
                log.warn(  # noqa: G010 - twisted.logger has no warning()
                    "DANE lookup for {domain} failed ({detail}); answering TEMP, never MTA-STS instead",
                    domain=domain, detail=found.detail)
            return self._render(key, domain, lookup, None, expires, text)
        # No DANE anywhere: the MTA-STS answer as without --dane, the MX
        # hosts used only where that answer uses them (a wildcard policy, a
        # [host] next hop).
        policy = lookup.policy
        assert policy is not None
        hosts = found.hosts if (bracketed or policy_has_wildcard(policy)) else None
        return self._render(key, domain, lookup, hosts, expires)

    def _render(
        self,
        key: str,
        domain: str,
        lookup: Lookup,
        hosts: Sequence[str] | None,
        expires: float,
        text: str | None = None,
    ) -> bytes:
        policy = lookup.policy
        assert policy is not None
        if text is None:
            text = render_answer(domain, policy, answer_settings(lookup, self.settings), hosts)
        kind = answer_kind(text)
        frame = _frame(text)
        _evict(self._memo, self.settings.memo_size)
        self._memo[key] = (policy, lookup.record_id, expires, kind, frame)
        self._count(kind)
        return frame

    def _failed(self, failure: Failure, parsed: ParsedKey) -> bytes:
        error = failure.value
        domain: str = parsed.domain  # type: ignore[assignment]
        if isinstance(error, PolicyLookupTemporaryError):
            if self._sink is not None:
                self._sink.record(error.result)
            text = render_failure(domain, error.reason, self.settings)
        elif isinstance(error, DomainError):
            text = "PERM " + str(error)[:200]
        elif isinstance(error, StoreError):
            # A known condition with its own reason (the database is down,
            # locked or full, or closed while the service stops): one line,
            # no traceback; Postfix retries on TEMP.
            if error.reason == "store-closed":
                log.info("MTA-STS policy lookup of {domain} ended by shutdown; answering TEMP", domain=domain)
            else:
                log.error("MTA-STS policy lookup of {domain} failed: store error ({reason}): {error}",
                          domain=domain, reason=error.reason, error=str(error))
            text = render_failure(domain, "internal-error", self.settings)
        else:
            log.failure("MTA-STS policy lookup of {domain} failed", failure, domain=domain)
            text = render_failure(domain, "internal-error", self.settings)
        self._count(answer_kind(text))
        return _frame(text)

    def _internal_error(self, failure: Failure, parsed: ParsedKey) -> bytes:
        log.failure("socketmap answer for {domain} failed", failure, domain=parsed.domain)
        self._count("temp")
        return _frame("TEMP internal error")
