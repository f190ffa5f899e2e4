"""
The client's side of one SMTP session with one MX host address, as the
plan asks (RFC 5321 §3–§4, RFC 3207): the greeting, EHLO (HELO fallback),
STARTTLS (L{mtasts_twisted.delivery.starttls}), one transaction (MAIL, one
RCPT per recipient, DATA) for an L{Envelope}, and QUIT.

  - L{Dialogue}: says all that over a L{ClientProtocol}; one per
    L{Deliverer<mtasts_twisted.delivery.Deliverer>}.  What a session did
    goes into its L{Attempt}; a session past its setup is a L{Connection}
    (L{mtasts_twisted.delivery.attempt}).
  - Before MAIL, what the message and the addresses need of the server
    (C{8BITMIME}, C{SMTPUTF8}, C{SIZE}; RFC 6152, RFC 6531, RFC 1870) and
    whether MAIL carries C{REQUIRETLS} (RFC 8689,
    L{mtasts_twisted.delivery.requiretls}).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.protocols.basic import FileSender

from mtasts_twisted.delivery.attempt import Attempt, Connection
from mtasts_twisted.delivery.danehost import tls_accepted
from mtasts_twisted.delivery.plan import PlannedHost
from mtasts_twisted.delivery.protocol import ClientProtocol, Clock, DataEncoder, Reply, SessionError, parse_ehlo
from mtasts_twisted.delivery.requiretls import requiretls_allows, session_refusal
from mtasts_twisted.delivery.starttls import start_tls
from mtasts_twisted.delivery.values import DeliverySettings, Envelope, Status
from mtasts_twisted.tls import MXTLSOptionsCache

__all__ = [
    "CLOSE_TIMEOUT",
    "QUIT_TIMEOUT",
    "Dialogue",
    "ip_of",
    "status_of",
]

#: Longest wait for the reply to QUIT (RFC 5321 §4.5.3.2 sets none).
QUIT_TIMEOUT = 10.0
#: Longest wait for a closed connection to be gone before aborting it.
CLOSE_TIMEOUT = 5.0


def ip_of(address: IAddress | None) -> str | None:
    """
    The IP address of a TCP endpoint's address as RFC 8460 §4.4 writes it
    (dot-decimal IPv4, RFC 5952 IPv6, no zone), or L{None} when it has
    none.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        return ipaddress.ip_address(host.partition("%")[0]).compressed
    except ValueError:
        return None


#: A message body up to this size goes in one write with its final dot;
#: a larger one through a producer, chunk by chunk.
ONE_WRITE_BODY = 64 * 1024


def status_of(reply: Reply) -> Status:
    """A refusal's L{Status}: permanent for 5xx, else transient."""
    return Status.PERMANENT if reply.kind == 5 else Status.TRANSIENT


class Dialogue:
    """
    What the client says in one SMTP session, and what it makes of the
    replies.  Every method runs on one L{ClientProtocol} and raises
    L{SessionError} when the session ends without deciding the pending
    recipients.
    """

    def __init__(self, clock: Clock, settings: DeliverySettings, tls_options: MXTLSOptionsCache) -> None:
        """
        @param clock: runs the close timeout.
        @param settings: the reply timeout and the EHLO name.
        @param tls_options: makes the TLS connection creator per session.
        """
        self._clock = clock
        self._timeout = settings.reply_timeout
        self._helo = settings.helo_name.encode("ascii")
        self._tls_options = tls_options

    async def open(
        self, proto: ClientProtocol, attempt: Attempt, target: PlannedHost, use_tls: bool, next_hop: str = ""
    ) -> dict[str, str]:
        """
        Greeting, EHLO, STARTTLS (if C{use_tls}) and EHLO again; return the
        extensions to use.  Sets C{attempt}'s TLS fields.

        @param next_hop: the recipient domain (a DANE-TA(2) certificate may
            name it, RFC 7672 §3.2.2).
        """
        timeout = self._timeout
        # RFC 8460 §4.4 sending-mta-ip: the address this session left from.
        attempt.local_ip = ip_of(proto.tls_transport.getHost())
        greeting = await proto.reply(timeout, "the greeting")
        if greeting.code != 220:
            # RFC 5321 §3.1: a 554 (or any non-220) greeting: try another host.
            raise SessionError(f"greeting: {greeting}", greeting.code)
        extensions = await self._ehlo(proto)

        if use_tls:
            reply = await start_tls(
                proto, attempt, target, extensions,
                tls_options=self._tls_options, helo=self._helo, timeout=timeout, next_hop=next_hop,
            )
            if reply is not None:
                extensions = await self._extensions(proto, reply, "EHLO after STARTTLS")

        if not tls_accepted(target, target.verify, attempt.tls_negotiated, attempt.verified):
            # start_tls raised already; this guards the promise itself.
            raise SessionError(f"not verified: refusing to send ({target.action.value})")
        return extensions

    async def close(self, proto: ClientProtocol, timer: IDelayedCall) -> None:
        """QUIT (unless the connection is gone), close, and stop the session timer."""
        try:
            await self._quit(proto)
        finally:
            if timer.active():
                timer.cancel()

    async def _quit(self, proto: ClientProtocol) -> None:
        if not proto.gone:
            try:
                await proto.command(b"QUIT", min(self._timeout, QUIT_TIMEOUT))
            except SessionError:
                pass
        if not proto.closed.called:
            transport = proto.tls_transport
            transport.loseConnection()
            call = self._clock.callLater(CLOSE_TIMEOUT, transport.abortConnection)
            await proto.closed
            if call.active():
                call.cancel()

    async def _ehlo(self, proto: ClientProtocol) -> dict[str, str]:
        reply = await proto.command(b"EHLO " + self._helo, self._timeout)
        return await self._extensions(proto, reply, "EHLO")

    async def _extensions(self, proto: ClientProtocol, reply: Reply, what: str) -> dict[str, str]:
        """The extensions an EHLO C{reply} lists, or none after a HELO."""
        if reply.code == 250:
            return parse_ehlo(reply)
        if reply.kind == 5:
            # RFC 5321 §3.2: a server that does not know EHLO: use HELO.
            helo = await proto.command(b"HELO " + self._helo, self._timeout)
            if helo.code == 250:
                return {}
            reply = helo
        raise SessionError(f"{what} refused: {reply}", reply.code)

    async def transaction(
        self,
        conn: Connection,
        attempt: Attempt,
        target: PlannedHost,
        envelope: Envelope,
        pending: list[str],
    ) -> None:
        """
        One transaction on C{conn} for the C{pending} recipients of
        C{envelope}; decide each of them in C{attempt}, or raise
        L{SessionError} before the end of data.
        """
        if not tls_accepted(target, conn.verify_mode, conn.tls_version is not None, conn.verified):
            # Guards the promise for new and reused sessions alike.
            raise SessionError(f"not verified: refusing to send ({target.action.value})")
        requiretls = self._requiretls(conn, attempt, target, envelope)
        conn.transactions += 1
        proto = conn.proto
        extensions = conn.extensions
        host = attempt.host
        timeout = self._timeout
        info = envelope.info
        reverse_path = envelope.reverse_path
        paths = envelope.forward_paths

        # -- what the message and addresses need (RFC 6152, RFC 6531, RFC 1870)
        params = b""
        if info.eight_bit:
            if "8BITMIME" not in extensions:
                for recipient in pending:
                    attempt.decide(
                        recipient,
                        Status.PERMANENT,
                        None,
                        f"5.6.3 the message has 8-bit data and {host} does not support 8BITMIME (RFC 6152)",
                    )
                return
            params += b" BODY=8BITMIME"
        utf8 = "SMTPUTF8" in extensions
        # RFC 6531 §3.2: a message submitted with SMTPUTF8 that has 8-bit
        # data may carry UTF-8 header fields (RFC 6532), at any MIME level:
        # it needs a server with SMTPUTF8, or it is rejected (a DSN).
        if envelope.smtputf8 and info.eight_bit and not utf8:
            for recipient in pending:
                attempt.decide(
                    recipient,
                    Status.PERMANENT,
                    None,
                    f"5.6.9 the message may have UTF-8 header fields and {host} does not support SMTPUTF8 (RFC 6531)",
                )
            return
        if reverse_path.smtputf8 and not utf8:
            for recipient in pending:
                attempt.decide(
                    recipient,
                    Status.PERMANENT,
                    None,
                    f"5.6.7 the sender address needs SMTPUTF8, which {host} does not support (RFC 6531)",
                )
            return
        sendable = []
        for recipient in pending:
            if paths[recipient].smtputf8 and not utf8:
                attempt.decide(
                    recipient,
                    Status.PERMANENT,
                    None,
                    f"5.6.7 the address needs SMTPUTF8, which {host} does not support (RFC 6531)",
                )
            else:
                sendable.append(recipient)
        if not sendable:
            return
        if (
            reverse_path.smtputf8
            or any(paths[r].smtputf8 for r in sendable)
            or (envelope.smtputf8 and info.eight_bit)
        ):
            # RFC 6531 §3.4: only when the envelope or the message needs it.
            params += b" SMTPUTF8"
        if "SIZE" in extensions:
            limit = extensions["SIZE"]
            if limit.isdigit() and int(limit) and info.size > int(limit):
                for recipient in sendable:
                    attempt.decide(
                        recipient,
                        Status.PERMANENT,
                        None,
                        f"5.3.4 the message ({info.size} octets) exceeds the {limit} octets {host} accepts (RFC 1870)",
                    )
                return
            params += b" SIZE=%d" % info.size
        if requiretls:
            params += b" REQUIRETLS"  # RFC 8689 §2 item 4, §4.2.1: passed on

        # -- the transaction (RFC 5321 §3.3)
        mail = b"MAIL FROM:<" + reverse_path.address + b">" + params
        rcpts = [b"RCPT TO:<" + paths[recipient].address + b">" for recipient in sendable]
        data_reply: Reply | None = None
        if "PIPELINING" in extensions:
            # RFC 2920 §3.1: MAIL and RCPT may go anywhere in a group, DATA
            # only last; one write, then every reply checked in order.
            proto.send_group([mail, *rcpts, b"DATA"])
            mail_reply = await proto.reply(timeout, "MAIL")
            rcpt_replies = [await proto.reply(timeout, "RCPT") for _ in rcpts]
            data_reply = await proto.reply(timeout, "DATA")
        else:
            mail_reply = await proto.command(mail, timeout)
            rcpt_replies = []
            if mail_reply.kind == 2:
                rcpt_replies = [await proto.command(rcpt, timeout) for rcpt in rcpts]
        if mail_reply.kind == 5:
            for recipient in sendable:
                attempt.decide(recipient, Status.PERMANENT, mail_reply.code, f"MAIL FROM refused: {mail_reply.text}")
            await _end_unwanted_data(proto, data_reply, timeout)
            return
        if mail_reply.kind != 2:
            raise SessionError(f"MAIL FROM: {mail_reply}", mail_reply.code)
        accepted = []
        for recipient, reply in zip(sendable, rcpt_replies):
            if reply.kind == 2:
                accepted.append(recipient)
            else:
                attempt.decide(recipient, status_of(reply), reply.code, reply.text)
        if not accepted:
            await _end_unwanted_data(proto, data_reply, timeout)
            return
        reply = data_reply if data_reply is not None else await proto.command(b"DATA", timeout)
        if reply.code != 354:
            for recipient in accepted:
                attempt.decide(recipient, status_of(reply), reply.code, f"DATA refused: {reply.text}")
            return
        message = envelope.message
        message.seek(info.start)
        encoder = DataEncoder()
        transport = proto.tls_transport
        head = message.read(ONE_WRITE_BODY)
        if len(head) < ONE_WRITE_BODY:
            # The usual message: content and the final dot in one write
            # (one TLS record, one send) instead of a producer's rounds.
            transport.write(encoder.encode(head) + encoder.finish())
        else:
            transport.write(encoder.encode(head))
            try:
                await FileSender().beginFileTransfer(message, transport, encoder.encode)
            except Exception:
                raise SessionError(f"connection lost while sending the message ({proto.error or 'stopped'})")
            if proto.gone:
                raise SessionError(f"connection lost while sending the message ({proto.error})")
            transport.write(encoder.finish())
        try:
            reply = await proto.reply(timeout, "the end of data")
        except SessionError as e:
            # The final dot is sent: the server may have taken the message
            # (RFC 1047); do not send it elsewhere in this call.
            for recipient in accepted:
                attempt.decide(
                    recipient,
                    Status.TRANSIENT,
                    None,
                    f"4.4.2 no reply from {host} after the end of data ({e}); it may have been delivered",
                )
            return
        for recipient in accepted:
            if reply.kind == 2:
                attempt.decide(recipient, Status.DELIVERED, reply.code, reply.text)
            else:
                attempt.decide(recipient, status_of(reply), reply.code, reply.text)

    @staticmethod
    def _requiretls(conn: Connection, attempt: Attempt, target: PlannedHost, envelope: Envelope) -> bool:
        """
        Whether MAIL carries C{REQUIRETLS}.  A REQUIRETLS message with a
        reverse-path goes only over a session that meets RFC 8689 §4.2.1
        (else L{RequireTLSError<mtasts_twisted.delivery.requiretls.RequireTLSError>},
        before MAIL); one with the null reverse-path (a bounce, §5) carries
        the parameter only where a session meets §2, and is sent anyway.
        """
        if not envelope.requiretls:
            return False
        refusal = session_refusal(
            tls_version=conn.tls_version, verified=conn.verified, verify_mode=conn.verify_mode,
            extensions=conn.extensions,
        )
        if envelope.reverse_path.address == b"":
            return refusal is None and requiretls_allows(target)
        if refusal is not None:
            attempt.requiretls_refused = refusal.kind
            raise refusal
        return True


async def _end_unwanted_data(proto: ClientProtocol, data_reply: Reply | None, timeout: float) -> None:
    """
    After a pipelined group whose MAIL or every RCPT failed: if the server
    took DATA anyway (354), end it with the empty content (RFC 2920 §3.1:
    the client must check every reply and cope with an accepted DATA), so
    the session stays in step for its next transaction.
    """
    if data_reply is not None and data_reply.code == 354:
        proto.tls_transport.write(b".\r\n")
        await proto.reply(timeout, "the end of data")
