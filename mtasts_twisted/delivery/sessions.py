"""
Session reuse (connection caching): finished SMTP sessions parked for the
next message to the same destination, and the rules for when that is
exactly as safe as a new session (see "Session reuse" in the
L{mtasts_twisted.delivery} docstring).

  - L{SessionPool}: a bounded pool of idle, parked sessions.  It knows
    nothing of SMTP: it keeps opaque sessions under hashable keys, newest
    first, each for at most C{idle_time} seconds (a timer on the injected
    clock), and at most C{max_sessions} in all.  A session that leaves the
    pool because its time is up or the pool is full is handed to the
    C{close} callable given at construction; one taken or discarded is the
    caller's again.
  - L{SessionCache}: the SMTP side.  After a transaction it parks the
    session (L{SessionCache.release}) when the reuse rules allow, else says
    QUIT and closes it in the background; before a new session it hands
    out a parked one that may carry the mail (L{SessionCache.take}), probed
    with RSET (L{SessionCache.probe}).

Like Postfix's C{scache} (C{smtp_connection_cache_time_limit}, 2 s by
default), the idle time is short: the point is back-to-back mail to one
destination, not holding connections open (RFC 5321 §4.5.3.2.7 lets a
server drop an idle client after 5 minutes, and busy servers do it much
sooner).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable, Sequence
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mtasts_twisted.delivery.danehost import DANE_ACTIONS, reuse_dane, tls_accepted
from mtasts_twisted.delivery.attempt import Connection
from mtasts_twisted.delivery.plan import DeliveryPlan, PlannedHost
from mtasts_twisted.delivery.protocol import ClientProtocol, Clock, SessionError
from mtasts_twisted.delivery.values import DeliverySettings
from mtasts_twisted.tls import VerifyMode

__all__ = ["RSET_TIMEOUT", "SessionCache", "SessionPool"]

log = Logger()

#: Longest wait for the reply to the RSET that probes a parked session
#: before reuse (RFC 5321 §4.5.3.2 sets none; Postfix's smtp_rset_timeout).
RSET_TIMEOUT = 20.0

S = TypeVar("S")


@attrs.define(eq=False)
class _Parked(Generic[S]):
    """One parked session, its key and its idle timer."""

    key: Hashable
    session: S
    timer: IDelayedCall | None


class SessionPool(Generic[S]):
    """
    Idle sessions by key, each kept at most C{idle_time} seconds.

    @ivar idle_time: seconds a session stays parked before it is closed.
    @ivar max_sessions: parked sessions kept at most; parking one more
        closes the oldest.
    """

    def __init__(
        self,
        clock: Clock,
        idle_time: float,
        max_sessions: int,
        close: Callable[[S], object],
    ) -> None:
        """
        @param clock: an C{IReactorTime} for the idle timers.
        @param idle_time: seconds a session stays parked (> 0).
        @param max_sessions: parked sessions kept at most (> 0).
        @param close: called with each session the pool gives up (idle
            time over, pool full); it must close the session.
        """
        self._clock = clock
        self.idle_time = idle_time
        self.max_sessions = max_sessions
        self._close = close
        #: Every parked session, oldest first (for eviction).
        self._parked: OrderedDict[int, _Parked[S]] = OrderedDict()
        #: Parked sessions per key, oldest first (the newest is taken).
        self._by_key: dict[Hashable, list[_Parked[S]]] = {}

    def __len__(self) -> int:
        """The number of parked sessions."""
        return len(self._parked)

    def __contains__(self, key: Hashable) -> bool:
        """Is a session parked under C{key}?"""
        return key in self._by_key

    def park(self, key: Hashable, session: S) -> None:
        """
        Keep C{session} under C{key} for at most C{idle_time} seconds.  If
        the pool is full, its oldest session is closed first.
        """
        while len(self._parked) >= self.max_sessions:
            _, oldest = self._parked.popitem(last=False)
            self._unlink(oldest)
            self._close(oldest.session)
        entry: _Parked[S] = _Parked(key, session, None)
        entry.timer = self._clock.callLater(self.idle_time, self._expire, entry)
        self._parked[id(session)] = entry
        self._by_key.setdefault(key, []).append(entry)

    def take(self, key: Hashable) -> S | None:
        """
        Remove and return the most recently parked session under C{key}
        (the least likely to have been dropped by the server), or L{None}.
        """
        entries = self._by_key.get(key)
        if not entries:
            return None
        entry = entries[-1]
        self._remove(entry)
        return entry.session

    def discard(self, session: S) -> bool:
        """
        Forget C{session} without closing it (e.g. its connection was lost
        while parked).  Return whether it was parked.
        """
        entry = self._parked.get(id(session))
        if entry is None or entry.session is not session:
            return False
        self._remove(entry)
        return True

    def clear(self) -> list[S]:
        """Forget every parked session and return them (oldest first), not closed."""
        sessions = []
        while self._parked:
            _, entry = self._parked.popitem(last=False)
            self._unlink(entry)
            sessions.append(entry.session)
        return sessions

    def _remove(self, entry: _Parked[S]) -> None:
        del self._parked[id(entry.session)]
        self._unlink(entry)

    def _unlink(self, entry: _Parked[S]) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entries = self._by_key[entry.key]
        entries.remove(entry)
        if not entries:
            del self._by_key[entry.key]

    def _expire(self, entry: _Parked[S]) -> None:
        # The timer has fired: no cancel needed, but _unlink checks active().
        self._remove(entry)
        self._close(entry.session)


class SessionCache:
    """
    The finished sessions of one L{Deliverer<mtasts_twisted.delivery.Deliverer>}:
    parked for reuse, or closed with QUIT in the background.

    @ivar pool: the parked sessions, or L{None} when reuse is off
        (C{DeliverySettings.reuse_idle_time} is 0).
    """

    def __init__(
        self,
        clock: Clock,
        settings: DeliverySettings,
        close: Callable[[ClientProtocol, IDelayedCall], Coroutine[Any, Any, None]],
    ) -> None:
        """
        @param clock: runs the idle timers and tells a session's age.
        @param settings: the C{reuse_*} limits and the MX hosts' ports.
        @param close: says QUIT on a session, closes it and stops its
            session timer (L{Dialogue.close
            <mtasts_twisted.delivery.dialogue.Dialogue.close>}).
        """
        self._clock = clock
        self._settings = settings
        self._close = close
        #: QUIT-and-close of finished sessions, still running in the background.
        self._closing: set[Deferred[None]] = set()
        self.pool: SessionPool[Connection] | None = None
        if settings.reuse_idle_time > 0:
            self.pool = SessionPool(
                clock, settings.reuse_idle_time, settings.reuse_max_idle_sessions, self._close_parked
            )
        #: Set by L{close}: sessions are no longer parked.
        self._shut = False

    def parked_first(self, plan: DeliveryPlan) -> Callable[[str], bool] | None:
        """
        For L{plan_attempts<mtasts_twisted.delivery.plan.plan_attempts>}'s
        C{first}: whether a session is parked for C{plan}'s mail to an MX
        host; L{None} when nothing is parked.
        """
        pool = self.pool
        if not pool:
            return None
        port_of = self._settings.port_of
        return lambda host: plan.reuse_key(host, port_of(host)) in pool

    def reusable(self, conn: Connection, plan: DeliveryPlan, target: PlannedHost, use_tls: bool = True) -> bool:
        """
        May C{conn}, which just carried a transaction of C{plan} to
        C{target} (or is parked under C{plan}'s key), carry the next one?
        """
        settings = self._settings
        if (
            not use_tls  # the plaintext retry: a new session tries STARTTLS first
            or conn.tls_version is None  # only sessions with TLS are kept
            or not conn.proto.idle
            or conn.transactions >= settings.reuse_max_transactions
            or self._clock.seconds() - conn.created >= settings.reuse_max_age
            or conn.key != plan.reuse_key(conn.host, settings.port_of(conn.host), reuse_dane(target))
        ):
            return False
        if target.require_tls:
            # RFC 8461 §5: only a session verified (PKIX and the MX host
            # name, §4.1) with verification required, to a host the policy
            # lists; the key's policy makes this hold already.  Under DANE
            # (RFC 7672 §3): authenticated by the TLSA records in the key.
            if target.action in DANE_ACTIONS:
                return tls_accepted(target, conn.verify_mode, True, conn.verified)
            return conn.verified and conn.verify_mode is VerifyMode.VERIFY and target.matches_policy
        return True

    def release(self, conn: Connection, plan: DeliveryPlan, target: PlannedHost, use_tls: bool) -> None:
        """
        After a transaction whose replies are all in: park the session for
        reuse, or say QUIT and close it in the background.  Either way the
        outcomes are reported now, so a relay records a delivery without
        waiting for a slow peer (which would widen its window for
        duplicates after a crash).
        """
        if self.pool is not None and not self._shut and self.reusable(conn, plan, target, use_tls):
            conn.proto.parked_hook = lambda: self._parked_event(conn)
            self.pool.park(conn.key, conn)
        else:
            self.close_in_background(conn.proto, conn.timer)

    def take(self, plan: DeliveryPlan, target: PlannedHost, ips: Sequence[str]) -> Connection | None:
        """
        A parked session that may carry C{plan}'s mail to C{target} now (at
        one of the addresses a new session would use), or L{None}.
        """
        if not self.pool:
            return None
        host = target.host
        key = plan.reuse_key(host, self._settings.port_of(host), reuse_dane(target))
        while (conn := self.pool.take(key)) is not None:
            conn.proto.parked_hook = None
            if conn.ip in ips and self.reusable(conn, plan, target):
                return conn
            self.close_in_background(conn.proto, conn.timer)
        return None

    async def probe(self, conn: Connection) -> bool:
        """
        Whether a session just taken still works; if not, it is closed in
        the background (and the caller goes on as if it had never been
        parked).
        """
        proto = conn.proto
        # RFC 5321 §4.1.1.5: RSET aborts whatever the last transaction left
        # (e.g. all recipients refused) and, answered 250, shows the server
        # still has the session (Postfix probes cached sessions the same way).
        try:
            reply = await proto.command(b"RSET", min(self._settings.reply_timeout, RSET_TIMEOUT))
        except SessionError as e:
            reply, why = None, str(e)
        else:
            why = str(reply)
        if reply is None or reply.code != 250:
            log.debug("parked session to {host} [{ip}] is gone ({why}); connecting anew",
                      host=conn.host, ip=conn.ip, why=why)
            if reply is not None:
                proto.drop(SessionError(f"RSET: {reply}", reply.code))
            self.close_in_background(proto, conn.timer)
            return False
        return True

    def _parked_event(self, conn: Connection) -> None:
        """Input or a lost connection while parked: the session is not reused."""
        if self.pool is not None:
            self.pool.discard(conn)
        self.close_in_background(conn.proto, conn.timer)

    def _close_parked(self, conn: Connection) -> None:
        """The pool gives C{conn} up (idle time over, pool full): QUIT."""
        conn.proto.parked_hook = None
        self.close_in_background(conn.proto, conn.timer)

    def close_in_background(self, proto: ClientProtocol, timer: IDelayedCall) -> None:
        """Say QUIT and close the session, without waiting for it (see L{wait_closed})."""
        closing = Deferred.fromCoroutine(self._close(proto, timer))
        self._closing.add(closing)
        closing.addBoth(lambda _: self._closing.discard(closing))

    def wait_closed(self) -> Deferred[None]:
        """
        Say QUIT on every parked session, and fire when every session's
        QUIT-and-close has finished.
        """
        if self.pool is not None:
            for conn in self.pool.clear():
                self._close_parked(conn)
        return gatherResults(list(self._closing), consumeErrors=True).addCallback(lambda _: None)

    def close(self) -> Deferred[None]:
        """Stop parking sessions, then L{wait_closed}."""
        self._shut = True
        return self.wait_closed()
