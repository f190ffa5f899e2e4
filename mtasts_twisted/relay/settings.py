"""
The relay's limits and schedule: L{RelaySettings}, one frozen value that
the intake, the queue and the workers all read.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import cast

import attrs
from twisted.internet.interfaces import IReactorThreads, IReactorTime

from mtasts_twisted.relay.queue import Queue

__all__ = ["LOOPBACK_NETWORKS", "IPNetwork", "RelaySettings", "client_key"]

#: A client network of C{allowed_networks}.
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The default C{allowed_networks}: loopback only.
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def client_key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """
    The client a connection from C{address} counts against for the
    per-client connection limit: every loopback address (127.0.0.0/8,
    C{::1}, and 127/8 mapped into IPv6) is the one client C{"loopback"} —
    a local user can bind any of them, so counting them apart would
    multiply the limit by 16 million.  Any other address is itself.
    """
    mapped = getattr(address, "ipv4_mapped", None)
    if address.is_loopback or (mapped is not None and mapped.is_loopback):
        return "loopback"
    return str(mapped or address)


@attrs.frozen
class RelaySettings:
    """
    Limits and schedule of the relay (defaults in parentheses).

    @ivar max_message_size: largest message accepted, octets (25 MiB).
    @ivar max_recipients: recipients per transaction (100; RFC 5321
        §4.5.3.1.8 asks for at least 100).
    @ivar max_queue_messages: messages queued at once (10000).
    @ivar max_queue_bytes: octets queued at once (2 GiB).
    @ivar allowed_networks: client networks allowed to submit (loopback).
    @ivar max_connections: concurrent SMTP connections in total (100).
    @ivar max_connections_per_ip: concurrent connections per client (20):
        per IP address, except that all of loopback (127.0.0.0/8, ::1) is
        one client (L{client_key}).  20 is
        Postfix's C{default_destination_concurrency_limit}: a Postfix that
        relays through this intake is not refused at its default.
    @ivar idle_timeout: seconds of silence before C{421} (300, RFC 5321
        §4.5.3.2.7).
    @ivar max_session_time: seconds one SMTP connection may last (3600).
    @ivar max_line_length: longest command or text line, octets without
        CRLF (8192; RFC 5321 §4.5.3.1.6 asks for 998, clients exceed it).
    @ivar retry_base: first retry delay, seconds (300); doubled per attempt.
    @ivar retry_max: largest retry delay, seconds (3600).
    @ivar expiry: seconds after arrival when pending recipients fail (5 days).
    @ivar concurrency: deliveries in flight in total (20).
    @ivar concurrency_per_domain: deliveries in flight per domain (4).
    @ivar reporting_mta: this relay's name in DSNs, C{Received:} and the
        greeting (the host name).
    @ivar poll_interval: seconds between queue scans (5).
    """

    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_queue_messages: int = 10_000
    max_queue_bytes: int = 2 * 1024 * 1024 * 1024
    allowed_networks: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    max_connections: int = 100
    max_connections_per_ip: int = 20
    idle_timeout: float = 300.0
    max_session_time: float = 3600.0
    max_line_length: int = 8192
    retry_base: float = 300.0
    retry_max: float = 3600.0
    expiry: float = 5 * 24 * 3600.0
    concurrency: int = 20
    concurrency_per_domain: int = 4
    reporting_mta: str = attrs.field(factory=socket.getfqdn)
    poll_interval: float = 5.0

    def retry_delay(self, attempts: int) -> float:
        """The delay before retry number C{attempts} (1 = first retry)."""
        return float(
            min(self.retry_max, self.retry_base * 2 ** max(0, min(attempts - 1, 32)))
        )

    def make_queue(self, directory: str, clock: IReactorTime | None = None) -> Queue:
        """
        A L{Queue} in C{directory} with these limits.  When C{clock} is a
        reactor with threads (C{IReactorThreads}), the intake's commit
        fsyncs run in its thread pool
        (L{mtasts_twisted.relay.spool.MessageWriter.commit_deferred}).
        """
        return Queue(
            directory,
            max_message_size=self.max_message_size,
            max_messages=self.max_queue_messages,
            max_bytes=self.max_queue_bytes,
            clock=clock,
            threads=cast(IReactorThreads, clock) if IReactorThreads.providedBy(clock) else None,
        )

