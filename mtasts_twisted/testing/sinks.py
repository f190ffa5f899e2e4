"""
Result sinks for tests: an L{IResultSink} that keeps what it is given.

Code under test hands every RFC 8460 L{Result} (a policy lookup, a delivery
attempt) to an L{IResultSink}; give it a L{ListSink} and assert on
L{ListSink.results} afterwards::

    from mtasts_twisted.testing.sinks import ListSink

    sink = ListSink()
    deliverer = Deliverer(reactor, resolver, cache, trust_root=None, sink=sink)
    ...
    self.assertEqual([r.success_count for r in sink.results], [1])

The sink that drops everything, for production use, is
L{mtasts_twisted.tlsrpt.aggregate.NullResultSink}.
"""

from __future__ import annotations

from zope.interface import implementer

from mtasts_twisted.interfaces import IResultSink
from mtasts_twisted.results import Result

__all__ = ["ListSink"]


@implementer(IResultSink)
class ListSink:
    """
    An L{IResultSink} that appends every recorded L{Result} to a list.

    Like every sink it never blocks and never fails the caller.

    @ivar results: the results recorded, oldest first.
    @ivar times: the C{when} given with each result (L{None} where the
        caller left it to the sink's clock), parallel to L{results}.
    """

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.times: list[float | None] = []

    def record(self, result: Result, when: float | None = None) -> None:
        """
        See L{IResultSink.record}: keep C{result} (and C{when}).

        @param result: the L{Result} to keep.
        @param when: POSIX seconds the result happened at, or L{None}.
        """
        self.results.append(result)
        self.times.append(when)
