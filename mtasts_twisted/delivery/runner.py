"""
One SMTP session of a delivery (L{SessionRunner}): a new connection to one
address of an MX host (connect, greeting, EHLO, STARTTLS as the plan asks,
one transaction; then the session parked for reuse or closed), or one
transaction on a parked session (L{mtasts_twisted.delivery.sessions}).

Either way its end is one L{Attempt}: an error of the session, or a bug
here, is the attempt's C{error} (the L{Deliverer
<mtasts_twisted.delivery.deliverer.Deliverer>} goes on with the next
address or host), never an exception that loses the delivery.  What is
said in the session is L{mtasts_twisted.delivery.dialogue}.
"""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from mtasts_twisted.delivery.attempt import Attempt, Connection
from mtasts_twisted.delivery.danehost import reuse_dane
from mtasts_twisted.delivery.dialogue import Dialogue
from mtasts_twisted.delivery.plan import DeliveryPlan, PlannedHost
from mtasts_twisted.delivery.protocol import ClientProtocol, SessionError
from mtasts_twisted.delivery.sessions import SessionCache
from mtasts_twisted.delivery.sources import DeliveryReactor
from mtasts_twisted.delivery.values import DeliverySettings, Envelope

__all__ = ["OneSessionFactory", "SessionRunner"]

# The deliverer's events keep the namespace they had before this module was split off.
log = Logger(namespace="mtasts_twisted.delivery.deliverer")


class OneSessionFactory(Factory):
    """
    Hands a client endpoint the one L{ClientProtocol} of a session, without
    Twisted's "Starting factory" / "Stopping factory" lines per connection
    (which C{connectProtocol}'s factory logs).
    """

    noisy = False

    def __init__(self, proto: ClientProtocol) -> None:
        """
        @param proto: the session's protocol.
        """
        self._proto = proto

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
        """The session's protocol."""
        return self._proto


class SessionRunner:
    """
    Runs the sessions of a L{Deliverer
    <mtasts_twisted.delivery.deliverer.Deliverer>}: one per call, new or
    parked (see the module docstring).
    """

    def __init__(
        self, reactor: DeliveryReactor, settings: DeliverySettings, dialogue: Dialogue, sessions: SessionCache
    ) -> None:
        """
        @param reactor: connects (C{IReactorTCP}) and runs the session
            timeout (C{IReactorTime}).
        @param settings: the port, connect and session timeouts.
        @param dialogue: what is said in a session.
        @param sessions: where a finished session is parked or closed.
        """
        self._reactor = reactor
        self._settings = settings
        self._dialogue = dialogue
        self._sessions = sessions

    async def new(
        self,
        plan: DeliveryPlan,
        target: PlannedHost,
        ip: str,
        envelope: Envelope,
        pending: list[str],
        use_tls: bool,
    ) -> Attempt:
        """
        One new session with address C{ip} of C{target}: connect, open it
        (with STARTTLS if C{use_tls}), one transaction for the C{pending}
        recipients of C{envelope}; then park it for reuse or close it.
        """
        host = target.host
        attempt = Attempt(host, ip)
        proto = ClientProtocol(self._reactor)
        endpoint_type = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        port = self._settings.port_of(host)
        endpoint = endpoint_type(self._reactor, ip, port, timeout=self._settings.connect_timeout)
        created = self._reactor.seconds()
        try:
            await endpoint.connect(OneSessionFactory(proto))
        except Exception as e:
            attempt.error = f"cannot connect to port {port}: {e}"
            return attempt
        timer = self._reactor.callLater(
            self._settings.session_timeout,
            proto.expire,
            SessionError(f"session timed out after {self._settings.session_timeout:g} s"),
        )
        conn: Connection | None = None
        try:
            extensions = await self._dialogue.open(proto, attempt, target, use_tls, plan.domain)
            conn = Connection(
                proto,
                timer,
                plan.reuse_key(host, port, reuse_dane(target)),
                host,
                ip,
                created,
                target.verify,
                attempt.tls_version,
                attempt.verified,
                extensions,
            )
            await self._dialogue.transaction(conn, attempt, target, envelope, pending)
        except SessionError as e:
            attempt.error = str(e)
            attempt.code = e.code
        except Exception as e:
            log.failure("SMTP session with {host} [{ip}] failed", host=host, ip=ip)
            attempt.error = f"internal error: {e!r}"
        if attempt.error is None:
            assert conn is not None
            self._sessions.release(conn, plan, target, use_tls)
        else:
            await self._dialogue.close(proto, timer)
        return attempt

    async def reused(
        self,
        conn: Connection,
        plan: DeliveryPlan,
        target: PlannedHost,
        envelope: Envelope,
        pending: list[str],
    ) -> Attempt | None:
        """
        One transaction on a parked session.  L{None} when the session
        turned out dead before the transaction began (the caller goes on
        as if it had never been parked).  A session that fails before the
        end of data leaves its undecided recipients pending for a new
        connection, like any failed session.  No TLSRPT result: RFC 8460
        §4 counts TLS sessions, and this one was counted when it was made.
        """
        if not await self._sessions.probe(conn):
            return None
        log.debug(
            "reusing the session to {host} [{ip}] ({tls_version}, verified={verified}) for transaction {number}",
            host=conn.host,
            ip=conn.ip,
            tls_version=conn.tls_version,
            verified=conn.verified,
            number=conn.transactions + 1,
        )
        attempt = Attempt(conn.host, conn.ip, tls_version=conn.tls_version, verified=conn.verified)
        try:
            await self._dialogue.transaction(conn, attempt, target, envelope, pending)
        except SessionError as e:
            attempt.error = str(e)
            attempt.code = e.code
        except Exception as e:  # noqa: BLE001 - a bug here must not lose the delivery
            log.failure("SMTP session with {host} [{ip}] failed", host=conn.host, ip=conn.ip)
            attempt.error = f"internal error: {e!r}"
        if attempt.error is None:
            self._sessions.release(conn, plan, target, True)
        else:
            log.debug("reused session to {host} [{ip}] failed ({error}); connecting anew",
                      host=conn.host, ip=conn.ip, error=attempt.error)
            await self._dialogue.close(conn.proto, conn.timer)
        return attempt
