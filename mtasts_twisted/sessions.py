"""
A bounded pool of idle, parked connections for reuse (connection caching).

L{mtasts_twisted.delivery.Deliverer} parks an SMTP session here after a
transaction instead of saying QUIT, and takes it back for the next message
to the same destination (see its module docstring for when a session may
be reused).  The pool itself knows nothing of SMTP: it keeps opaque
sessions under hashable keys, newest first, each for at most C{idle_time}
seconds (a timer on the injected clock), and at most C{max_sessions} in
all.  A session that leaves the pool because its time is up or the pool is
full is handed to the C{close} callable given at construction; one taken
or discarded is the caller's again.

Like Postfix's C{scache} (C{smtp_connection_cache_time_limit}, 2 s by
default), the idle time is short: the point is back-to-back mail to one
destination, not holding connections open (RFC 5321 §4.5.3.2.7 lets a
server drop an idle client after 5 minutes, and busy servers do it much
sooner).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import attrs

__all__ = ["SessionPool"]

S = TypeVar("S")


@attrs.define(eq=False)
class _Parked(Generic[S]):
    """One parked session, its key and its idle timer."""

    key: Hashable
    session: S
    timer: Any


class SessionPool(Generic[S]):
    """
    Idle sessions by key, each kept at most C{idle_time} seconds.

    @ivar idle_time: seconds a session stays parked before it is closed.
    @ivar max_sessions: parked sessions kept at most; parking one more
        closes the oldest.
    """

    def __init__(
        self,
        clock: Any,
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
