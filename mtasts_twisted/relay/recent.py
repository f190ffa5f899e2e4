"""
What the relay just wrote, kept in memory for its first delivery attempt.

A message is usually delivered a moment after it was queued.  Reading its
envelope and body back from the files written a moment earlier cost the
relay's one reactor thread about a tenth of its time per message
(bench/RESULTS.md, issue 19), so the queue keeps:

  - L{RecentBodies}: the bodies small enough to have been held in memory
    until their commit (L{mtasts_twisted.relay.spool.BUFFERED_SIZE}),
    bounded in total, oldest dropped first.  A body never changes once
    committed, so a copy is as good as the file; the files stay the
    durable truth, and a body not kept here is read from its file.

The envelope's parsed form is kept by the queue's own stat-keyed cache,
filled at commit (L{mtasts_twisted.relay.queue.Queue}).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["DEFAULT_RECENT_BYTES", "RecentBodies"]

#: Bodies kept at most, in octets (128 of the largest buffered bodies).
DEFAULT_RECENT_BYTES = 8 * 1024 * 1024


class RecentBodies:
    """Recently committed message bodies by message id, bounded in total size."""

    def __init__(self, max_bytes: int = DEFAULT_RECENT_BYTES) -> None:
        """@param max_bytes: the most octets kept; 0 keeps nothing."""
        self.max_bytes = max_bytes
        self.size = 0
        self._bodies: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._bodies)

    def put(self, ident: str, body: bytes) -> None:
        """Keep C{body} for message C{ident}, dropping the oldest to make room."""
        self.pop(ident)
        if len(body) > self.max_bytes:
            return
        self._bodies[ident] = body
        self.size += len(body)
        while self.size > self.max_bytes:
            _, dropped = self._bodies.popitem(last=False)
            self.size -= len(dropped)

    def get(self, ident: str) -> bytes | None:
        """The body of message C{ident}, if kept."""
        return self._bodies.get(ident)

    def pop(self, ident: str) -> None:
        """Forget message C{ident} (removed, or its body no longer needed)."""
        body = self._bodies.pop(ident, None)
        if body is not None:
            self.size -= len(body)
