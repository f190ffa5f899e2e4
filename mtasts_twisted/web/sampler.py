"""
L{CounterSampler}: per-hour counts of a counter that a component keeps
only as running totals (the socketmap's answers by kind), for the status
page's charts.  Every C{interval} seconds it reads the totals and counts
their increase in the hour of the reading; a total that went down (a new
component after a restart of it) counts from zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime

from mtasts_twisted.periodic import Periodic

__all__ = ["CounterSampler"]


class CounterSampler(Service):
    """
    Read running totals periodically and count their increases per hour.

    @ivar interval: seconds between readings.
    """

    def __init__(self, read: Callable[[], Mapping[str, int] | None], add: Callable[[str, float, int], None],
                 clock: IReactorTime, interval: float = 60.0) -> None:
        """
        @param read: returns the running totals by key, or L{None} (the
            component is not there yet).
        @param add: counts C{(key, when, n)} (C{HourlyCounts.add}).
        @param clock: the reactor's time.
        @param interval: seconds between readings.
        """
        self._read = read
        self._add = add
        self._clock = clock
        self.interval = interval
        self._last: dict[str, int] = {}
        self._loop: Periodic | None = None

    def sample(self) -> None:
        """Read the totals once and count what they grew by since the last reading."""
        totals = self._read()
        if totals is None:
            return
        now = self._clock.seconds()
        for key, total in totals.items():
            before = self._last.get(key, 0)
            grown = total - before if total >= before else total
            if grown:
                self._add(key, now, grown)
            self._last[key] = total

    def startService(self) -> None:
        """Read every L{interval} seconds (the first reading now)."""
        super().startService()
        self._loop = Periodic("status page sampler", self.sample, self.interval, self._clock)
        self._loop.start(now=True)

    def stopService(self) -> None:
        """Take a last reading, then stop."""
        super().stopService()
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
            self.sample()
