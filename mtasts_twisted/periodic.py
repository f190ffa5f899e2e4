"""
L{Periodic}: a task run every C{interval} seconds that survives its own
errors, for every loop of the service (the relay's queue poll, the policy
refresher, the TLSRPT flush, the cache's C{last_use} writes).

Twisted's C{LoopingCall} stops for good at the first exception its
function raises (or the first failed L{Deferred} it returns): one
C{OSError} from a short file descriptor exhaustion, or a database that
was away for one run, would end the loop until the process restarts.
A L{Periodic} logs the failure, waits longer (doubling, up to
C{max_backoff}) and goes on; the first success after failures is logged
and the normal interval resumes.

Low in the package (no imports of it): any layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["DEFAULT_MAX_BACKOFF", "Periodic"]

log = Logger()

#: The longest wait after repeated failures (unless the interval is longer).
DEFAULT_MAX_BACKOFF = 60.0


class Periodic:
    """
    Call C{function()} every C{interval} seconds until L{stop}.

    A call that returns a L{Deferred} is waited for: the next call is due
    C{interval} seconds after the previous one I{began} (at once if that
    time has passed), never while one is under way.  A call that raises or
    fails is logged (the first of a streak with its traceback, the next
    ones as one line) and the next one is due after
    C{interval * 2 ** (failures - 1)} seconds, capped at
    C{max(interval, max_backoff)}.

    @ivar name: the task's name in log events (e.g. C{"relay queue poll"}).
    @ivar interval: seconds between calls.
    @ivar max_backoff: the longest wait after failures (never below
        C{interval}).
    @ivar failures: failures in a row (0 after a success).
    @ivar total_failures: failures since the start.
    @ivar calls: calls made since the start.
    """

    def __init__(self, name: str, function: Callable[[], object], interval: float, clock: IReactorTime,
                 max_backoff: float = DEFAULT_MAX_BACKOFF) -> None:
        """
        @param name: see L{name}.
        @param function: called with no arguments; may return a L{Deferred}.
        @param interval: see L{interval}; must be positive.
        @param clock: an C{IReactorTime} (the reactor or a C{task.Clock}).
        @param max_backoff: see L{max_backoff}.
        """
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self.name = name
        self.interval = float(interval)
        self.max_backoff = max(self.interval, float(max_backoff))
        self.failures = 0
        self.total_failures = 0
        self.calls = 0
        self._function = function
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._busy: Deferred[Any] | None = None
        self._running = False

    @property
    def running(self) -> bool:
        """Whether L{start} was called and L{stop} was not since."""
        return self._running

    def start(self, now: bool = True) -> None:
        """
        Start calling.

        @param now: make the first call now (synchronously), else after
            C{interval}.
        """
        if self._running:
            raise RuntimeError(f"{self.name} is already running")
        self._running = True
        if now:
            self._run()
        else:
            self._later(self.interval)

    def stop(self) -> None:
        """Make no more calls (a call under way ends on its own)."""
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def next_delay(self) -> float:
        """Seconds from the start of one call to the next, given L{failures}."""
        if not self.failures:
            return self.interval
        return min(self.max_backoff, self.interval * 2.0 ** min(self.failures - 1, 64))

    def _later(self, delay: float) -> None:
        self._call = self._clock.callLater(max(0.0, delay), self._run)

    def _run(self) -> None:
        self._call = None
        if not self._running or self._busy is not None:
            return
        began = float(self._clock.seconds())
        self.calls += 1
        d = self._busy = maybeDeferred(self._function)
        d.addCallbacks(self._succeeded, self._failed)
        d.addBoth(self._next, began)

    def _succeeded(self, result: object) -> None:
        if self.failures:
            log.info("periodic task {name} recovered after {failures} failure(s)",
                     name=self.name, failures=self.failures)
        self.failures = 0

    def _failed(self, failure: Failure) -> None:
        self.failures += 1
        self.total_failures += 1
        delay = self.next_delay()
        if self.failures == 1:
            log.failure("periodic task {name} failed; next try in {delay} s", failure,
                        name=self.name, delay=delay)
        else:
            log.error("periodic task {name} failed again ({failures} in a row): {error}; next try in {delay} s",
                      name=self.name, failures=self.failures, error=failure.getErrorMessage(), delay=delay)

    def _next(self, ignored: object, began: float) -> None:
        self._busy = None
        if self._running and self._call is None:
            self._later(began + self.next_delay() - float(self._clock.seconds()))
