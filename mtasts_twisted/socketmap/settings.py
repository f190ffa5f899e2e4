"""
How the socketmap server answers and what it allows a client:
L{SocketmapSettings}, one frozen value read by the answers, the connection
protocol and the server.

Sizing the connection caps: Postfix's socketmap client (dict_sockmap)
keeps one connection per process and socketmap endpoint, sends one request
at a time, closes the connection after 10 s without lookups or 100 s in all,
and on a connection closed under it reconnects and asks once more.  So
Postfix needs at most one connection per smtp(8)/lmtp(8) process
(C{default_process_limit}, 100 per master.cf service), all from one address:
C{max_connections_per_client} (256) leaves room for two such services,
C{max_connections} (1024) for four such clients; the service sets both and
keeps them below its file descriptor limit.  A connection closed to make
room at a cap costs Postfix a reconnect, not a failed lookup.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["DEFAULT_SETTINGS", "SocketmapSettings"]


def _frozen_names(value: Iterable[str] | None) -> frozenset[str] | None:
    return None if value is None else frozenset(value)


@attrs.frozen
class SocketmapSettings:
    """
    How the socketmap server answers.

    @ivar strict_testing: answer a C{testing} policy like C{enforce}.
    @ivar tlsrpt_attributes: add the Postfix >= 3.10 TLSRPT attributes
        (C{policy_type}, C{policy_domain}, C{mx_host_pattern},
        C{policy_string}) to policy answers, and answer C{testing} policies
        with C{testing_level}.
    @ivar fail_open: answer C{NOTFOUND } instead of C{TEMP} when the policy
        cannot be determined now and nothing is cached (Postfix then
        delivers with its default TLS level instead of deferring).
    @ivar max_request: the largest request payload, in bytes; a longer
        netstring closes the connection.
    @ivar idle_timeout: seconds without a complete request after which a
        connection with no request in flight is closed (bytes of a partial
        request do not count, so a slowloris client is closed too);
        L{None} (or 0) for never.  The connection is aborted: answers a
        client has not read are dropped with it.
    @ivar first_request_timeout: the same for a connection that has not
        sent a complete request yet (Postfix sends its request as soon as it
        connects); the shorter of the two applies.  L{None} (or 0): only
        C{idle_timeout}.
    @ivar map_names: the socketmap names answered (the last field of
        C{socketmap:inet:host:port:name}); a request for any other name is
        answered C{PERM unknown map name ...}.  L{None} answers any name.
    @ivar max_connections: connections served at once, from all clients.
        At the cap a new connection is still accepted and an idle one is
        closed to make room (see L{SocketmapFactory.buildProtocol
        <mtasts_twisted.socketmap.server.SocketmapFactory.buildProtocol>});
        only when every connection waits for a lookup is the new one closed.
        L{None} for no limit.
    @ivar max_connections_per_client: the same cap per client IP address
        (connections over UNIX sockets have no address and only count
        towards C{max_connections}).  Postfix opens at most one connection
        per smtp(8) or lmtp(8) process, all from one address: keep this above
        the process limits of those services.  L{None} for no limit.
    @ivar max_pipeline: answers a connection may have waiting for lookups
        (with the answers queued behind them, in request order); at the cap
        reading stops until they have gone out.  Postfix sends one request
        and waits for its answer.
    @ivar testing_level: the Postfix TLS security level answered for a
        C{testing} policy when C{tlsrpt_attributes} is on (see
        L{mtasts_twisted.socketmap.answers}); L{None} answers C{NOTFOUND }.
    @ivar mx_retry: seconds an answer built without a usable MX answer
        (lookup failed or no MX) is reused before the MX is looked up again.
    @ivar dane: never override DANE (RFC 7672): before an answer that sets
        a TLS level (an MTA-STS C{OK} answer), look up the MX hosts' DANE
        status and answer C{OK dane-only}, C{OK dane} or C{TEMP} when DANE
        applies (see L{mtasts_twisted.socketmap.dane}).  Off: the answers
        ignore DANE.
    @ivar dane_max_age: the longest a next hop's DANE verdict (and the
        answer built on it) is reused, in seconds, whatever its TTLs say; a
        failed DANE lookup's C{TEMP} is reused for C{mx_retry}.
    @ivar memo_size: rendered answers kept, and parsed keys kept (each table
        evicts its oldest entry when full).
    """

    strict_testing: bool = False
    tlsrpt_attributes: bool = False
    fail_open: bool = False
    max_request: int = 10000
    idle_timeout: float | None = 300.0
    first_request_timeout: float | None = 10.0
    map_names: frozenset[str] | None = attrs.field(default=frozenset({"postfix"}), converter=_frozen_names)
    max_connections: int | None = 1024
    max_connections_per_client: int | None = 256
    max_pipeline: int = 32
    testing_level: str | None = "may"
    mx_retry: float = 60.0
    memo_size: int = 10000
    dane: bool = False
    dane_max_age: float = 3600.0


#: The settings used when none are given.
DEFAULT_SETTINGS = SocketmapSettings()
