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

import enum
from collections.abc import Mapping
from typing import Any, Callable

import attrs
from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IListeningPort, IOpenSSLServerConnectionCreator, IReactorTCP
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mtasts_twisted.testing.https import abort_connection, port_number
from mtasts_twisted.testing.pki import IssuedCertificate

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


class Stage(enum.Enum):
    """Points in an SMTP session where a test can script a reply or a stall."""

    GREETING = "greeting"
    EHLO = "EHLO"
    STARTTLS = "STARTTLS"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_DATA = "end-of-data"


class StartTLS(enum.Enum):
    """
    How the server treats STARTTLS (RFC 3207).

    @cvar OFFER: advertise it and start TLS with the configured certificate.
    @cvar NOT_OFFERED: do not advertise it (and answer 454 if asked).
    @cvar REFUSE: advertise it, then answer C{454 TLS not available}.
    @cvar ALERT: advertise it, answer 220, then fail the handshake: the
        server only speaks TLS 1.1 (L{TLS11OnlyServer}), so a client that
        requires TLS >= 1.2 receives a protocol_version alert.
    """

    OFFER = "offer"
    NOT_OFFERED = "not-offered"
    REFUSE = "refuse"
    ALERT = "alert"


@attrs.frozen
class Reply:
    """An SMTP reply: code and text."""

    code: int
    text: str = "scripted reply"


def _lower_keys(value: Mapping[str, Reply]) -> Mapping[str, Reply]:
    return {k.lower(): v for k, v in value.items()}


@attrs.frozen
class Behaviour:
    """
    What the server does in a session.

    @ivar certificate: the certificate presented after STARTTLS, unless
        C{certificates_by_name} has one for the client's SNI name.
    @ivar certificates_by_name: certificates chosen by SNI name.
    @ivar starttls: a L{StartTLS}.  C{OFFER} without any certificate does
        not advertise STARTTLS.
    @ivar replies: replace the normal reply at L{Stage.GREETING},
        L{Stage.EHLO}, L{Stage.MAIL}, L{Stage.DATA} or L{Stage.END_OF_DATA}
        (after a scripted GREETING the server closes the connection).
    @ivar recipient_replies: the reply to C{RCPT TO} per address
        (case-insensitive); others get 250.
    @ivar stall_at: never reply from this stage on (the command is
        recorded; later input too).
    @ivar drop_during_data: close the connection abruptly once message data
        has started to arrive.
    @ivar extensions: extra EHLO keywords, e.g. C{"8BITMIME"},
        C{"SMTPUTF8"}, C{"SIZE 1000"}.
    @ivar hostname: the name in the greeting and the EHLO reply.
    """

    certificate: IssuedCertificate | None = None
    certificates_by_name: Mapping[str, IssuedCertificate] = attrs.field(
        factory=dict, converter=_lower_keys
    )
    starttls: StartTLS = StartTLS.OFFER
    replies: Mapping[Stage, Reply] = attrs.field(factory=dict)
    recipient_replies: Mapping[str, Reply] = attrs.field(factory=dict, converter=_lower_keys)
    stall_at: Stage | None = None
    drop_during_data: bool = False
    extensions: tuple[str, ...] = ()
    hostname: str = "mx.test"


@attrs.frozen
class Command:
    """
    One command line the server received.

    @ivar line: the line, without CRLF.
    @ivar tls: whether it arrived under TLS.
    @ivar read: which read of the session's input it came in (1, 2, ...):
        lines sent in one write by a pipelining client (RFC 2920) share it.
    """

    line: bytes
    tls: bool
    read: int = 0

    @property
    def verb(self) -> str:
        """The command word, upper case (C{"MAIL"}, C{"EHLO"}, ...)."""
        parts = self.line.split(None, 1)
        return parts[0].decode("ascii", "replace").upper() if parts else ""


@attrs.frozen
class ReceivedMessage:
    """
    A message the server received (complete or cut short).

    @ivar mail_from: the reverse path, e.g. C{"a@example.org"} (C{""} for
        the null path).
    @ivar recipients: the accepted recipients.
    @ivar data: the message as received (see the module docstring).
    @ivar tls_at_mail: whether C{MAIL FROM} came under TLS.
    @ivar tls: whether C{DATA} and the message came under TLS.
    @ivar tls_version: e.g. C{"TLSv1.3"}, or L{None} in plaintext.
    @ivar sni: the SNI name the client sent, or L{None}.
    @ivar complete: whether the final C{.} arrived.
    @ivar accepted: whether the server answered the final C{.} with 250.
    @ivar mail_parameters: the parameters of its C{MAIL FROM} command,
        upper case, e.g. C{("SIZE=120", "REQUIRETLS")} (RFC 5321
        §4.1.2 Mail-parameters).
    """

    mail_from: str
    recipients: tuple[str, ...]
    data: bytes
    tls_at_mail: bool
    tls: bool
    tls_version: str | None
    sni: str | None
    complete: bool
    accepted: bool
    mail_parameters: tuple[str, ...] = ()


@attrs.define
class Session:
    """
    One connection to the server.

    @ivar peer: the client's IP address.
    @ivar commands: every command line, in order, with its TLS state.
    @ivar tls: whether STARTTLS was answered with 220 (later input is TLS).
    @ivar tls_version: the negotiated TLS version once TLS carried data.
    @ivar sni: the SNI name the client sent, once TLS carried data.
    @ivar messages: the messages of this session.
    @ivar closed: whether the connection has ended.
    @ivar close_reason: why it ended (the exception's text).
    """

    peer: str
    commands: list[Command] = attrs.field(factory=list)
    tls: bool = False
    tls_version: str | None = None
    sni: str | None = None
    messages: list[ReceivedMessage] = attrs.field(factory=list)
    closed: bool = False
    close_reason: str | None = None

    def plaintext_commands(self) -> list[Command]:
        """The commands that arrived outside TLS."""
        return [c for c in self.commands if not c.tls]


# Commands that carry the envelope, the message or credentials: what
# must never cross in plaintext to an enforce domain (RFC 8461 §5).
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


def _server_context(issued: IssuedCertificate) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    leaf, *chain = issued.certificates()
    context.use_certificate(leaf)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(issued.private_key())
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Server TLS (TLS >= 1.2) presenting a certificate chosen by the client's
    SNI name, or a default one.
    """

    def __init__(
        self,
        default: IssuedCertificate,
        by_name: Mapping[str, IssuedCertificate] | None = None,
        *,
        max_version: int | None = None,
    ) -> None:
        """
        @param default: the certificate for unknown or absent SNI names.
        @param by_name: certificates by SNI name (case-insensitive).
        @param max_version: the highest TLS version, e.g.
            C{OpenSSL.SSL.TLS1_2_VERSION}; default: OpenSSL's.
        """
        self._max_version = max_version
        self._by_name: dict[str, SSL.Context] = {}
        for name, issued in (by_name or {}).items():
            self._by_name[name.lower()] = self._configure(_server_context(issued))
        self.context = self._configure(_server_context(default))
        # Set before any Connection uses it: pyOpenSSL forbids changing a
        # used Context.
        self.context.set_tlsext_servername_callback(self._select)

    def _configure(self, context: SSL.Context) -> SSL.Context:
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        if self._max_version is not None:
            context.set_max_proto_version(self._max_version)
        return context

    def _select(self, connection: SSL.Connection) -> None:
        name = connection.get_servername()
        context = self._by_name.get(name.decode("ascii").lower()) if name else None
        if context is not None:
            connection.set_context(context)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """Make the server side of one TLS connection."""
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLServerConnectionCreator)
class TLS11OnlyServer:
    """
    Server TLS that speaks TLS 1.1 and nothing else (OpenSSL security level
    0, which TLS 1.1 needs nowadays): a client requiring TLS >= 1.2
    receives a protocol_version alert.

    Twisted's C{CertificateOptions} with C{lowerMaximumSecurityTo=TLSv1_1}
    does not make this server: without C{@SECLEVEL=0}, OpenSSL has no
    protocol left and fails with "no protocols available", sometimes
    without a well-formed alert.
    """

    def __init__(self, issued: IssuedCertificate) -> None:
        """@param issued: the certificate to present."""
        context = _server_context(issued)
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """Make the server side of one TLS connection."""
        return SSL.Connection(self.context, None)
