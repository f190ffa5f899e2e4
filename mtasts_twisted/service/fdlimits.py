"""
File descriptors: the service raises its soft C{RLIMIT_NOFILE} to the hard
limit at start (L{raise_fd_limit}) and sizes the listeners' connection
caps well below it (L{size_connection_caps}), so that clients holding
connections open cannot take the descriptors the queue, the database and
the deliveries need.

The sizing (logged at start), for a limit C{L}::

    2 x (socketmap cap + SMTP cap) + metrics cap + deliveries + reserve <= L

  - I{reserve} (L{RESERVE}, 64): standard streams, log files, the
    database (SQLite's file, WAL and shared memory, or PostgreSQL
    connections), the listening sockets, the reactor's wakers and thread
    pool, the queue's directory scans and file writes, and the DNS and
    HTTPS sockets of lookups and reports not tied to a connection.
  - I{deliveries}: per delivery slot (C{concurrency} of the relay), 3
    (the MX connection, the message file, a DNS socket), plus the
    outbound sessions parked for reuse.
  - a metrics connection counts 1 (it is answered from memory), and only
    when the endpoint is on (C{--metrics}).
  - each accepted connection counts 2: its socket, and the one more it may
    cause while served (a socketmap lookup's DNS query or policy fetch, an
    SMTP message spooled to a file).

The caps are the defaults (socketmap 1024, SMTP 100, 20 per client)
when they fit; otherwise both are scaled down in proportion.
"""

from __future__ import annotations

import attrs

__all__ = ["RESERVE", "ConnectionCaps", "FDLimit", "raise_fd_limit", "size_connection_caps"]

#: Descriptors kept for everything but connections and deliveries (see the
#: module docstring).
RESERVE = 64

#: Descriptors counted per delivery slot: MX connection, message file, DNS.
PER_DELIVERY = 3

#: Descriptors counted per accepted connection: its socket and one more.
PER_CONNECTION = 2

#: Soft limits tried, in order, when the hard limit is unlimited (Linux
#: refuses more than C{fs.nr_open}, 1048576 by default).
_UNLIMITED_TRIES = (1 << 20, 65536, 10240)


@attrs.frozen
class FDLimit:
    """
    The process's file descriptor limit.

    @ivar before: the soft limit found at start.
    @ivar soft: the soft limit now (what the caps are sized for).
    @ivar hard: the hard limit (C{None}: unlimited).
    """

    before: int
    soft: int
    hard: int | None


def raise_fd_limit() -> FDLimit:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit (or as far as the
    system allows when the hard limit is unlimited).  Never fails: where
    the limit cannot be read or raised, what there is is kept.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return FDLimit(before=1024, soft=1024, hard=None)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinity = resource.RLIM_INFINITY
    hard_limit = None if hard == infinity else hard
    if soft == infinity:
        return FDLimit(before=_UNLIMITED_TRIES[0], soft=_UNLIMITED_TRIES[0], hard=hard_limit)
    tries = (hard,) if hard_limit is not None else _UNLIMITED_TRIES
    for target in tries:
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return FDLimit(before=soft, soft=target, hard=hard_limit)
    return FDLimit(before=soft, soft=soft, hard=hard_limit)


@attrs.frozen
class ConnectionCaps:
    """
    The listeners' connection caps for one file descriptor limit.

    @ivar fd_limit: the soft limit sized for.
    @ivar reserve: descriptors kept aside (L{RESERVE}).
    @ivar deliveries: descriptors counted for deliveries and parked sessions.
    @ivar socketmap: socketmap connections served at once.
    @ivar smtp: SMTP intake connections at once.
    @ivar smtp_per_ip: SMTP intake connections per client IP.
    @ivar scaled: whether the defaults did not fit and were scaled down.
    @ivar metrics: metrics endpoint connections at most (its own cap; not
        scaled).
    """

    fd_limit: int
    reserve: int
    deliveries: int
    socketmap: int
    smtp: int
    smtp_per_ip: int
    scaled: bool
    metrics: int = 0

    @property
    def used(self) -> int:
        """Descriptors the sizing accounts for (at most C{fd_limit}, unless it is tiny)."""
        return (PER_CONNECTION * (self.socketmap + self.smtp) + self.metrics + self.deliveries
                + self.reserve)

    def describe(self) -> str:
        """The figures as one line, for the start-up log."""
        return (f"{PER_CONNECTION} x ({self.socketmap} socketmap + {self.smtp} SMTP connections)"
                + (f" + {self.metrics} metrics" if self.metrics else "")
                + f" + {self.deliveries} for deliveries + {self.reserve} reserve = {self.used}"
                f" <= {self.fd_limit} file descriptors"
                + (" (connection caps scaled down to fit)" if self.scaled else ""))


def size_connection_caps(fd_limit: int, socketmap: int = 1024, smtp: int = 100, smtp_per_ip: int = 20,
                         delivery_slots: int = 20, parked_sessions: int = 50,
                         metrics: int = 0) -> ConnectionCaps:
    """
    The connection caps for C{fd_limit} (see the module docstring).

    @param fd_limit: the soft C{RLIMIT_NOFILE}.
    @param socketmap: the socketmap's cap when it fits (0: no socketmap).
    @param smtp: the SMTP intake's cap when it fits (0: no intake).
    @param smtp_per_ip: the per-client-IP cap when it fits.
    @param delivery_slots: deliveries in flight at once (0 without relay).
    @param parked_sessions: outbound sessions parked for reuse at most.
    @param metrics: the metrics endpoint's connection cap (0: endpoint off).
    """
    deliveries = PER_DELIVERY * delivery_slots + parked_sessions
    wanted = socketmap + smtp
    budget = max(0, (fd_limit - RESERVE - deliveries - metrics) // PER_CONNECTION)
    if wanted <= budget:
        return ConnectionCaps(fd_limit, RESERVE, deliveries, socketmap, smtp, min(smtp_per_ip, smtp), False,
                              metrics)
    # Scaled in proportion; a listener that is on keeps at least one.
    new_socketmap = (socketmap * budget) // wanted
    new_smtp = budget - new_socketmap
    if socketmap:
        new_socketmap = max(1, new_socketmap)
    if smtp:
        new_smtp = max(1, min(new_smtp, smtp))
    else:
        new_smtp = 0
    return ConnectionCaps(fd_limit, RESERVE, deliveries, new_socketmap, new_smtp,
                          min(smtp_per_ip, new_smtp), True, metrics)
