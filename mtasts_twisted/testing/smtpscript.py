"""
What the loopback SMTP test server (L{mtasts_twisted.testing.smtp}) is told
to do in a session (L{Behaviour}: scripted replies by L{Stage}, STARTTLS
offered or not, stalls) and what it records (L{Session}, L{Command},
L{ReceivedMessage}): frozen values and plain records, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from mtasts_twisted.testing.pki import IssuedCertificate

__all__ = ["Behaviour", "Command", "ReceivedMessage", "Reply", "Session", "Stage", "StartTLS"]


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
