"""
twisted.mail's C{ESMTPSenderFactory}, driven for one L{SessionAttempt}.

L{RecordingSenderFactory} is twisted.mail's factory with the settings a
policy-enforcing sender needs (C{retries=0}: failover is ours; no AUTH;
C{requireTransportSecurity} and C{contextFactory} from the attempt) and a
protocol that also

  - notes what twisted.mail does not tell (L{SessionObservation}: whether
    the first EHLO offered STARTTLS, whether the end of data was sent);
  - encodes DATA with L{DataEncoder<mtasts_twisted.delivery.protocol.DataEncoder>}:
    twisted.mail's C{transformChunk} turns every LF into CRLF (so CRLF
    input became CR CR LF) and dot-stuffs within one 16 KiB chunk only,
    so a line C{"."} starting a chunk ended the message early; and
  - says when its connection is gone (L{RecordingSenderFactory.closed}).

L{send_attempt} connects it with C{reactor.connectTCP} (not an endpoint:
through an endpoint, twisted.mail's Deferred never fires on a TLS failure,
docs/design.rst), bounds the whole session, waits for the connection to
close and L{classify}es the result.
"""

from __future__ import annotations

from typing import IO, Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConnector, IDelayedCall, IReactorTCP, IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mtasts_twisted.delivery.protocol import DataEncoder
from mtasts_twisted.delivery.values import DeliverySettings
from mtasts_twisted.twistedmail.attempts import AttemptOutcome, SessionAttempt, SessionObservation, classify

__all__ = ["CLOSE_TIMEOUT", "RecordingSender", "RecordingSenderFactory", "SenderReactor", "send_attempt"]

log = Logger()

#: Longest wait, after the sender's Deferred fired, for its connection to
#: close (the QUIT exchange) before it is aborted (the reply timeout when
#: shorter; none after a timeout).
CLOSE_TIMEOUT = 5.0


class SenderReactor(IReactorTCP, IReactorTime):
    """
    What sending needs of a reactor: C{IReactorTCP} and C{IReactorTime}.
    For typing only (the global reactor provides both); never ask
    C{providedBy}.
    """


class RecordingSender(smtp.ESMTPSender):
    """
    twisted.mail's C{ESMTPSender}, noting what it does in the factory's
    L{SessionObservation} and encoding DATA properly (see the module
    docstring).
    """

    factory: RecordingSenderFactory
    _encoder: DataEncoder | None = None

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, Any]) -> None:
        """After an EHLO reply: note whether STARTTLS was offered, then go on."""
        observation = self.factory.observation
        if not self._tlsMode and observation.starttls_offered is None:
            observation.starttls_offered = b"STARTTLS" in items
        super().tryTLS(code, resp, items)

    def smtpState_data(self, code: int, resp: bytes) -> None:
        """354 to DATA: stream the message through a fresh L{DataEncoder}."""
        self.factory.observation.data_started = True
        self._encoder = DataEncoder()
        super().smtpState_data(code, resp)

    def transformChunk(self, chunk: bytes) -> bytes:
        """CRLF line ends and dot-stuffing across chunk boundaries (RFC 5321 §4.5.2)."""
        self.resetTimeout()
        assert self._encoder is not None
        return self._encoder.encode(chunk)

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        """The rest of the message and the end of data."""
        assert self._encoder is not None
        tail, self._encoder = self._encoder.finish(), None
        self.log.append(b">>> .")
        self.factory.observation.dot_sent = True
        self.transport.write(tail)  # type: ignore[union-attr]


class RecordingSenderFactory(smtp.ESMTPSenderFactory):
    """
    C{ESMTPSenderFactory} for one L{SessionAttempt}: no retries, no AUTH,
    the attempt's TLS requirement and creator, a L{SessionObservation}, and
    L{closed}.

    @ivar attempt: the L{SessionAttempt}.
    @ivar observation: what its protocol saw.
    @ivar closed: fires (with L{None}) once the connection is gone or could
        not be made.
    """

    protocol = RecordingSender
    noisy = False

    def __init__(
        self,
        attempt: SessionAttempt,
        from_addr: bytes,
        to_addrs: list[bytes],
        message: IO[bytes],
        deferred: Deferred[Any],
        *,
        helo: bytes,
        reply_timeout: float | None,
    ) -> None:
        """
        @param attempt: the connection to make.
        @param from_addr: the reverse path (C{b""} for the null sender).
        @param to_addrs: the forward paths (ASCII; A-label domains).
        @param message: the message file, positioned at its start; read in
            chunks, never whole.
        @param deferred: fires as twisted.mail's sender fires it.
        @param helo: the EHLO name.
        @param reply_timeout: seconds to wait for each reply.
        """
        super().__init__(
            None,
            None,
            from_addr,
            to_addrs,
            message,
            deferred,
            retries=0,
            timeout=reply_timeout,
            contextFactory=attempt.context_factory,
            # RFC 3207 §4 leaves plaintext to the client, except where the
            # policy requires TLS (RFC 8461 §5): no HELO fallback then.
            heloFallback=not attempt.require_tls,
            requireAuthentication=False,
            requireTransportSecurity=attempt.require_tls,
        )
        self.domain = helo
        self.attempt = attempt
        self.observation = SessionObservation()
        self.closed: Deferred[None] = Deferred()
        self._proto: smtp.ESMTPSender | None = None

    def buildProtocol(self, addr: Any) -> smtp.ESMTPSender:
        """twisted.mail's protocol, remembered for L{abort} (twisted.mail forgets it once the send is over)."""
        self._proto = proto = super().buildProtocol(addr)
        return proto

    def clientConnectionFailed(self, connector: IConnector, err: Failure) -> None:
        """Fail the send (twisted.mail), then fire L{closed}."""
        try:
            super().clientConnectionFailed(connector, err)
        finally:
            self._closed()

    def clientConnectionLost(self, connector: IConnector, err: Failure) -> None:
        """Fail the send if it is not finished (twisted.mail), then fire L{closed}."""
        try:
            super().clientConnectionLost(connector, err)
        finally:
            self._closed()

    def _closed(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)

    def abort(self, connector: IConnector) -> None:
        """Stop now: no retry, the connection (or connecting) aborted."""
        self.sendFinished = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            # Not loseConnection: over TLS it waits for a handshake (and a
            # close_notify) that a stalled peer never sends.
            cast(ITCPTransport, proto.transport).abortConnection()
        else:
            connector.disconnect()


async def send_attempt(
    reactor: SenderReactor,
    attempt: SessionAttempt,
    from_addr: bytes,
    to_addrs: list[bytes],
    message: IO[bytes],
    settings: DeliverySettings,
    helo: bytes | None = None,
) -> AttemptOutcome:
    """
    One session of twisted.mail's sender for C{attempt}; never fails.

    @param reactor: connects (C{connectTCP}) and times.
    @param attempt: where and how.
    @param from_addr: the reverse path.
    @param to_addrs: the forward paths.
    @param message: the message, positioned at its start.
    @param settings: C{connect_timeout}, C{reply_timeout},
        C{session_timeout} and (unless C{helo}) C{helo_name}.
    @param helo: the EHLO name, overriding C{settings.helo_name}.
    @return: the L{AttemptOutcome}, once the connection is closed.
    """
    factory: RecordingSenderFactory | None = None
    connector: IConnector | None = None

    def cancel(d: Deferred[Any]) -> None:
        if factory is not None and connector is not None:
            factory.abort(connector)

    done: Deferred[Any] = Deferred(cancel)
    factory = RecordingSenderFactory(
        attempt,
        from_addr,
        to_addrs,
        message,
        done,
        helo=helo if helo is not None else settings.helo_name.encode("ascii"),
        reply_timeout=settings.reply_timeout,
    )
    connector = reactor.connectTCP(attempt.ip, attempt.port, factory, timeout=settings.connect_timeout)

    def expire() -> None:
        if not done.called:
            done.errback(smtp.SMTPTimeoutError(
                -1, f"session timed out after {settings.session_timeout:g} s".encode(), None))
            cancel(done)

    timer: IDelayedCall = reactor.callLater(settings.session_timeout, expire)
    result: Any
    try:
        result = await done
    except CancelledError:
        # The caller gave up (the canceller aborted the connection).
        raise
    except Exception as e:
        result = Failure(e)
    finally:
        if timer.active():
            timer.cancel()
    outcome = classify(attempt, result, factory.observation)
    if not factory.closed.called:
        if isinstance(outcome.error, smtp.SMTPTimeoutError):
            # The server stopped answering: no QUIT exchange to wait for.
            factory.abort(connector)
        else:
            # The QUIT exchange; a server that does not close is aborted.
            wait = min(CLOSE_TIMEOUT, settings.reply_timeout)
            guard = reactor.callLater(wait, factory.abort, connector)
            await factory.closed
            if guard.active():
                guard.cancel()
        await factory.closed
    return outcome
