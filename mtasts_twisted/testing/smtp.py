"""
A loopback ESMTP server for tests: STARTTLS with certificates from
L{mtasts_twisted.testing.pki.PKI}, scripted failures, and a record of what
it received and whether it was under TLS.

Built on twisted.mail's server protocol (L{twisted.mail.smtp.ESMTP}) with
an C{IMessageDelivery} of its own.  Example::

    pki = PKI()
    server = SMTPTestServer(Behaviour(certificate=pki.valid("mx1.example.com")))
    port = server.start()                # 127.0.0.1, ephemeral port
    self.addCleanup(server.stop)
    ...  # deliver to 127.0.0.1:port
    [message] = server.messages
    self.assertTrue(message.tls)
    self.assertEqual(server.plaintext_transactions(), [])

Change C{server.behaviour} between connections to script the next session;
each connection uses the behaviour current when it was accepted.

Message data is recorded as the lines the server protocol hands over
(dot-unstuffed, CRLF-terminated).  twisted.mail's server inserts an empty
line before a message that starts without a header; no C{Received:} line
is added.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.testing.serving import abort_connection, port_number
from mtasts_twisted.testing.smtpscript import Behaviour, Command, ReceivedMessage, Reply, Session, Stage, StartTLS
from mtasts_twisted.testing.smtptls import ServerTLS, TLS11OnlyServer

__all__ = [
    "Behaviour",
    "Command",
    "ReceivedMessage",
    "Reply",
    "SMTPTestServer",
    "Session",
    "Stage",
    "ServerTLS",
    "StartTLS",
    "TLS11OnlyServer",
]

log = Logger()


_TRANSACTION_VERBS = frozenset({"MAIL", "RCPT", "DATA", "BDAT", "AUTH"})

_STAGE_BY_VERB = {
    "EHLO": Stage.EHLO,
    "STARTTLS": Stage.STARTTLS,
    "MAIL": Stage.MAIL,
    "RCPT": Stage.RCPT,
    "DATA": Stage.DATA,
}


@implementer(smtp.IMessage)
class _MessageSink:
    """Collects the lines of one message (one per recipient; the first records)."""

    def __init__(self, transaction: _Transaction, primary: bool) -> None:
        self._transaction = transaction
        self._primary = primary

    def lineReceived(self, line: bytes) -> None:
        if self._primary:
            self._transaction.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if self._primary:
            self._transaction.complete = True
        return defer.succeed(None)

    def connectionLost(self) -> None:
        if self._primary:
            self._transaction.finish(accepted=False)


@attrs.define
class _Transaction:
    session: Session
    mail_from: str
    tls_at_mail: bool
    mail_parameters: tuple[str, ...] = ()
    recipients: list[str] = attrs.field(factory=list)
    lines: list[bytes] = attrs.field(factory=list)
    tls: bool = False
    complete: bool = False
    finished: bool = False
    sinks: int = 0

    def finish(self, accepted: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self.session.messages.append(
            ReceivedMessage(
                mail_from=self.mail_from,
                recipients=tuple(self.recipients),
                data=b"".join(line + b"\r\n" for line in self.lines),
                tls_at_mail=self.tls_at_mail,
                tls=self.tls,
                tls_version=self.session.tls_version if self.tls else None,
                sni=self.session.sni if self.tls else None,
                complete=self.complete,
                accepted=accepted and self.complete,
                mail_parameters=self.mail_parameters,
            )
        )


def _mail_parameters(session: Session) -> tuple[str, ...]:
    """The parameters of the session's last C{MAIL FROM} (after the path's C{>})."""
    for command in reversed(session.commands):
        if command.verb == "MAIL":
            rest = command.line.rpartition(b">")[2]
            return tuple(w.decode("utf-8", "replace").upper() for w in rest.split())
    return ()


@implementer(smtp.IMessageDelivery)
class _Delivery:
    """The server's C{IMessageDelivery}: scripted MAIL/RCPT replies."""

    def __init__(self, proto: _ServerProtocol) -> None:
        self._proto = proto

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: list[smtp.User]) -> None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        reply = self._proto.behaviour.replies.get(Stage.MAIL)
        if reply is not None:
            raise smtp.SMTPServerError(reply.code, reply.text)
        self._proto.transaction = _Transaction(
            session=self._proto.session,
            mail_from=str(origin),
            tls_at_mail=self._proto.session.tls,
            mail_parameters=_mail_parameters(self._proto.session),
        )
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], smtp.IMessage]:
        address = str(user.dest)
        reply = self._proto.behaviour.recipient_replies.get(address.lower())
        if reply is not None and reply.code >= 300:
            raise smtp.SMTPServerError(reply.code, reply.text)
        transaction = self._proto.transaction
        assert transaction is not None
        transaction.recipients.append(address)

        def sink() -> _MessageSink:
            transaction.sinks += 1
            return _MessageSink(transaction, primary=transaction.sinks == 1)

        return sink


class _ServerProtocol(smtp.ESMTP):
    """twisted.mail's ESMTP server, scripted by a L{Behaviour}."""

    # No idle timer: stop() closes what is left.  (None turns TimeoutMixin's
    # timer off; Twisted's default of 600 makes mypy think it is an int.)
    timeout = None  # type: ignore[assignment]
    noisy = False

    def __init__(self, server: SMTPTestServer, behaviour: Behaviour) -> None:
        super().__init__(contextFactory=server._server_tls(behaviour))
        self.server = server
        self.behaviour = behaviour
        self.session: Session
        self.transaction: _Transaction | None = None
        self.delivery = _Delivery(self)
        self.host = behaviour.hostname.encode("ascii")
        self._stalled = False
        self._muted = False
        self._reads = 0
        self._lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._reads += 1
        super().dataReceived(data)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.session = Session(peer=getattr(peer, "host", str(peer)))
        self.server.sessions.append(self.session)
        self.server._live.add(self)
        reply = self.behaviour.replies.get(Stage.GREETING)
        stall = self.behaviour.stall_at is Stage.GREETING
        self._muted = stall or reply is not None
        super().connectionMade()
        self._muted = False
        if stall:
            self._stalled = True
        elif reply is not None:
            self.sendCode(reply.code, reply.text.encode())
            self.transport.loseConnection()  # type: ignore[union-attr]

    def sendCode(self, code: int, message: bytes = b"") -> None:
        if not self._muted:
            super().sendCode(code, message)

    def extensions(self) -> dict[bytes, Any]:
        ext = super().extensions()
        ext.pop(b"AUTH", None)
        if self.behaviour.starttls is StartTLS.REFUSE and not self.startedTLS:
            ext[b"STARTTLS"] = None
        for keyword in self.behaviour.extensions:
            name, _, params = keyword.partition(" ")
            ext[name.encode("ascii")] = [params.encode("ascii")] if params else None
        return ext

    def _note_tls(self) -> None:
        session = self.session
        if self.startedTLS and session.tls_version is None:
            handle = self.transport.getHandle()  # type: ignore[union-attr]
            session.tls_version = handle.get_protocol_version_name()
            name = handle.get_servername()
            session.sni = name.decode("ascii") if name else None

    def lineReceived(self, line: bytes) -> Any:
        self._note_tls()
        if self.mode is not smtp.DATA:
            command = Command(line=line, tls=self.session.tls, read=self._reads)
            self.session.commands.append(command)
            if self._stalled:
                return None
            stage = _STAGE_BY_VERB.get(command.verb)
            if stage is not None and stage is self.behaviour.stall_at:
                self._stalled = True
                return None
        elif self._stalled:
            return None
        return super().lineReceived(line)

    def do_EHLO(self, rest: bytes) -> None:
        reply = self.behaviour.replies.get(Stage.EHLO)
        if reply is not None:
            self.sendCode(reply.code, reply.text.encode())
            return
        super().do_EHLO(rest)

    def ext_STARTTLS(self, rest: bytes) -> None:
        super().ext_STARTTLS(rest)
        if self.startedTLS:
            self.session.tls = True

    def do_DATA(self, rest: bytes) -> None:
        reply = self.behaviour.replies.get(Stage.DATA)
        if reply is not None and self._from is not None and self._to:
            self._from = None
            self._to = []
            self.transaction = None
            self.sendCode(reply.code, reply.text.encode())
            return
        if self.transaction is not None:
            self.transaction.tls = self.session.tls
        super().do_DATA(rest)

    def dataLineReceived(self, line: bytes) -> Any:
        if self._stalled:
            return None
        transaction = self.transaction
        if transaction is not None and line == b"." and self.behaviour.stall_at is Stage.END_OF_DATA:
            self._stalled = True
        result = super().dataLineReceived(line)
        if (
            self.behaviour.drop_during_data
            and transaction is not None
            and not transaction.complete
            and transaction.lines
        ):
            transaction.finish(accepted=False)
            # Input already buffered would still be read: ignore it.
            self._stalled = self._muted = True
            self.transport.abortConnection()  # type: ignore[union-attr]
        return result

    # SMTP.lineReceived dispatches to state_DATA, bound in SMTP's class body.
    state_DATA = dataLineReceived

    def _messageHandled(self, resultList: Any) -> None:
        # twisted.mail calls this once every message sink saw the final ".";
        # it sends the end-of-data reply.
        transaction, self.transaction = self.transaction, None
        reply = self.behaviour.replies.get(Stage.END_OF_DATA)
        accepted = reply is None or 200 <= reply.code < 300
        if transaction is not None:
            transaction.finish(accepted=accepted and not self._stalled)
        if self._stalled:
            return
        if reply is not None:
            self.sendCode(reply.code, reply.text.encode())
            return
        super()._messageHandled(resultList)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.transaction is not None and self.mode is smtp.DATA:
            self.transaction.finish(accepted=False)
        super().connectionLost(reason)
        self.session.closed = True
        self.session.close_reason = str(reason.value)
        log.debug(
            "SMTP test session from {peer} closed: {reason}",
            peer=self.session.peer,
            reason=self.session.close_reason,
        )
        self.server._live.discard(self)
        self._lost.callback(None)


class _Factory(protocol.ServerFactory):
    noisy = False

    def __init__(self, server: SMTPTestServer) -> None:
        self._server = server

    def buildProtocol(self, addr: IAddress | None) -> _ServerProtocol:
        proto = _ServerProtocol(self._server, self._server.behaviour)
        proto.factory = self
        return proto


class SMTPTestServer:
    """
    An ESMTP server on 127.0.0.1 with an ephemeral port, for tests.

    @ivar behaviour: the L{Behaviour} for the next connection; settable.
    @ivar sessions: a L{Session} per connection, oldest first.
    @ivar host: C{"127.0.0.1"}.
    @ivar port: the TCP port, once L{start}ed.
    """

    host = "127.0.0.1"

    def __init__(self, behaviour: Behaviour | None = None, *, reactor: IReactorTCP | None = None) -> None:
        """
        @param behaviour: the initial L{Behaviour} (default: STARTTLS not
            offered, everything accepted).
        @param reactor: the reactor to listen on (default: the global one).
        """
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.sessions: list[Session] = []
        self.port: int | None = None
        self._listening: IListeningPort | None = None
        self._live: set[_ServerProtocol] = set()
        self._tls: dict[int, tuple[Behaviour, ServerTLS | TLS11OnlyServer]] = {}

    def start(self) -> int:
        """Listen on 127.0.0.1 (an ephemeral port); return the port."""
        self._listening = self._reactor.listenTCP(0, _Factory(self), interface=self.host)
        self.port = port = port_number(self._listening.getHost())
        return port

    def stop(self) -> defer.Deferred[None]:
        """
        Stop listening and abort every open connection.

        @return: a L{Deferred} that fires when the port and every
            connection are closed.
        """
        waits: list[defer.Deferred[Any]] = []
        if self._listening is not None:
            waits.append(defer.maybeDeferred(self._listening.stopListening))
            self._listening = None
        for proto in list(self._live):
            waits.append(proto._lost)
            abort_connection(proto.transport)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message of every session, in order."""
        return [m for s in self.sessions for m in s.messages]

    def plaintext_transactions(self) -> list[Command]:
        """
        The envelope, data and AUTH commands (MAIL, RCPT, DATA, BDAT, AUTH)
        that arrived outside TLS in any session: empty when nothing of a
        message was received in plaintext.  (EHLO, STARTTLS and QUIT before
        TLS are normal.)
        """
        return [
            c
            for s in self.sessions
            for c in s.plaintext_commands()
            if c.verb in _TRANSACTION_VERBS
        ]

    def _server_tls(self, behaviour: Behaviour) -> ServerTLS | TLS11OnlyServer | None:
        # One server TLS object per behaviour, reused by its connections.
        default = behaviour.certificate
        if default is None and behaviour.certificates_by_name:
            default = next(iter(behaviour.certificates_by_name.values()))
        if behaviour.starttls is StartTLS.OFFER and default is not None:
            make: Callable[[], ServerTLS | TLS11OnlyServer] = lambda: ServerTLS(default, behaviour.certificates_by_name)
        elif behaviour.starttls is StartTLS.ALERT:
            if default is None:
                raise ValueError("StartTLS.ALERT needs a certificate")
            make = lambda: TLS11OnlyServer(default)
        else:
            return None
        cached = self._tls.get(id(behaviour))
        if cached is None or cached[0] is not behaviour:
            cached = self._tls[id(behaviour)] = (behaviour, make())
        return cached[1]
