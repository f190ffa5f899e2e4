"""
Which connection goes when a connection cap is reached:
L{ConnectionTable}, the open socketmap connections by age and by client,
and its choice of the one to close to make room for a new connection.

A cap that refuses new connections lets whoever holds the connections shut
everyone else out (issue 17: 1,024 idle connections refused every new
client for 300 s, Postfix's included).  So a new connection is accepted and
an idle one is closed instead:

  1. the oldest connection that has not sent a complete request yet
     (Postfix sends its request as soon as it connects, so a connection
     still silent is the least likely to be Postfix's);
  2. else the oldest connection with no lookup in flight (Postfix closes
     its connections after 100 s anyway, and reconnects and asks again when
     one is closed under it);
  3. never one waiting for a lookup: if every connection does, the new one
     is refused.

The table is updated only when a connection opens, sends its first request
and closes: nothing per request.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol as TypingProtocol

__all__ = ["Admitted", "ConnectionTable"]


class Admitted(TypingProtocol):
    """
    What the table needs from a connection.

    @ivar client: the client's key (its IP address), or L{None} for a
        connection without one (a UNIX socket): such a connection counts only
        in the total.
    """

    client: Hashable | None

    @property
    def closable(self) -> bool:
        """May it be closed to make room: no lookup in flight, and not closing already?"""


class _Group:
    """Connections in opening order: those without a request yet, and the others."""

    __slots__ = ("active", "fresh")

    def __init__(self) -> None:
        # dicts as insertion-ordered sets: the first key is the oldest
        self.fresh: dict[Admitted, None] = {}
        self.active: dict[Admitted, None] = {}

    def __len__(self) -> int:
        return len(self.fresh) + len(self.active)

    def victim(self) -> Admitted | None:
        for connection in self.fresh:
            if connection.closable:
                return connection
        for connection in self.active:
            if connection.closable:
                return connection
        return None


class ConnectionTable:
    """
    The open connections, oldest first, in all and per client; picks the
    connection to close when a cap is reached (see the module docstring).
    """

    def __init__(self) -> None:
        self._all = _Group()
        self._clients: dict[Hashable, _Group] = {}

    def __len__(self) -> int:
        """The connections in the table."""
        return len(self._all)

    def __contains__(self, connection: object) -> bool:
        """Is C{connection} in the table?"""
        group = self._all
        return connection in group.fresh or connection in group.active

    def count(self, client: Hashable) -> int:
        """The connections of C{client} in the table."""
        group = self._clients.get(client)
        return 0 if group is None else len(group)

    def add(self, connection: Admitted) -> None:
        """Enter a new connection (it has not sent a request yet)."""
        self._all.fresh[connection] = None
        if connection.client is not None:
            group = self._clients.get(connection.client)
            if group is None:
                group = self._clients[connection.client] = _Group()
            group.fresh[connection] = None

    def activate(self, connection: Admitted) -> None:
        """C{connection} has sent its first complete request."""
        groups = [self._all]
        if connection.client is not None and connection.client in self._clients:
            groups.append(self._clients[connection.client])
        for group in groups:
            if connection in group.fresh:
                del group.fresh[connection]
                group.active[connection] = None

    def remove(self, connection: Admitted) -> None:
        """Forget C{connection} (closed, or chosen to close); no error if it is not in the table."""
        self._all.fresh.pop(connection, None)
        self._all.active.pop(connection, None)
        client = connection.client
        group = self._clients.get(client) if client is not None else None
        if group is not None:
            group.fresh.pop(connection, None)
            group.active.pop(connection, None)
            if not group:
                del self._clients[client]

    def victim(self, client: Hashable | None = None) -> Admitted | None:
        """
        The connection to close to make room: of C{client}, or of all
        clients when C{client} is L{None}; L{None} when every candidate waits
        for a lookup.
        """
        if client is None:
            return self._all.victim()
        group = self._clients.get(client)
        return None if group is None else group.victim()
