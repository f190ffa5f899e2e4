"""
Prototype of a proposed hot-path fix that is not in the package, to measure
its gain (bench/daemon.py --prototype uses it).

The first prototype here, remembering confirmed lookups until the TXT TTL
ends, has landed in mtasts_twisted.cache (PolicyCache._confirmed).  What
remains is the write path: Twisted buffers each socketmap answer and sends
it on the next reactor turn (two epoll_ctl calls per lookup); writing to
the socket directly while the transport's buffer is empty saves about half
of the remaining per-lookup CPU.  It bypasses the transport abstraction, so
it stays a measured proposal, not package code.
"""

from __future__ import annotations

from mtasts_twisted.socketmap import SocketmapFactory, SocketmapProtocol


class _DirectWrite:
    __slots__ = ("_t", "_send")

    def __init__(self, transport) -> None:
        self._t = transport
        self._send = transport.socket.send

    def write(self, data: bytes) -> None:
        t = self._t
        if not t._tempDataBuffer and len(t.dataBuffer) == t.offset and t.connected and not t.disconnecting:
            try:
                sent = self._send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let the transport see and report the error
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)

    def __getattr__(self, name):
        return getattr(self._t, name)


class DirectWriteProtocol(SocketmapProtocol):
    def makeConnection(self, transport) -> None:
        if hasattr(transport, "socket") and hasattr(transport, "_tempDataBuffer"):
            transport = _DirectWrite(transport)
        super().makeConnection(transport)


class DirectWriteFactory(SocketmapFactory):
    protocol = DirectWriteProtocol

    def buildProtocol(self, addr):
        limit = self.settings.max_connections
        if limit is not None and self.connections >= limit:
            self.counts["refused"] += 1
            return None
        return DirectWriteProtocol(self)
