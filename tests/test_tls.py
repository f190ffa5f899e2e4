"""
Tests for L{mtasts_twisted.tls}: real TLS over loopback against servers
presenting certificates from the test PKI, in both verify modes, and
STARTTLS through twisted.mail's ESMTP client against the SMTP fixture.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet import defer, endpoints, interfaces, protocol, reactor
from twisted.internet._sslverify import IOpenSSLTrustRoot  # only exported there
from twisted.mail import smtp
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtasts_twisted import tls as tls_module
from mtasts_twisted.pkix import load_trust_roots as load_trust_root, verify_error_name
from mtasts_twisted.results import FailureDetails, ResultType
from mtasts_twisted.testing.pki import PKI, IssuedCertificate
from mtasts_twisted.testing.smtp import (
    Behaviour,
    ServerTLS,
    SMTPTestServer,
    StartTLS,
    TLS11OnlyServer,
)
from tests.clients import ClosingSenderFactory
from mtasts_twisted.tls import (
    MXConnectionCreator,
    MXTLSOptionsCache,
    TLSOutcome,
    TLSVerificationError,
    VerifyMode,
)
from mtasts_twisted.delivery.details import mx_mismatch_details, starttls_not_supported_details

MX = "mx.example.com"
_PKI = PKI()


@implementer(interfaces.IHandshakeListener)
class _ServerProtocol(protocol.Protocol):
    """Records the SNI name and TLS version the server saw."""

    def __init__(self) -> None:
        self.sni: str | None = None
        self.version: str | None = None
        self.lost: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()
        name = handle.get_servername()
        self.sni = name.decode("ascii") if name else None
        self.version = handle.get_protocol_version_name()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class _ServerFactory(protocol.Factory):
    def __init__(self) -> None:
        self.protocols: list[_ServerProtocol] = []

    def buildProtocol(self, addr: Any) -> _ServerProtocol:
        proto = _ServerProtocol()
        proto.factory = self
        self.protocols.append(proto)
        return proto


@implementer(interfaces.IHandshakeListener)
class _ClientProtocol(protocol.Protocol):
    """Fires C{settled} at handshake completion or connection loss."""

    def __init__(self) -> None:
        self.completed = False
        self.reason: Failure | None = None
        self.settled: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.completed = True
        if not self.settled.called:
            self.settled.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        if not self.settled.called:
            self.settled.callback(None)
        self.lost.callback(None)


class _Connection:
    """What one loopback TLS connection gave: client, creator, server side."""

    def __init__(self, creator: MXConnectionCreator, client: _ClientProtocol, server: _ServerFactory) -> None:
        self.creator = creator
        self.client = client
        self.server = server

    @property
    def outcome(self) -> TLSOutcome:
        outcome = self.creator.outcome()
        assert outcome is not None
        return outcome


class LoopbackTLSMixin:
    timeout = 30

    async def connect(
        self,
        server_tls: Any,
        mode: VerifyMode,
        hostname: str = MX,
        trust: Any = None,
        cache: MXTLSOptionsCache | None = None,
    ) -> _Connection:
        """
        Listen with C{server_tls} (an L{IssuedCertificate} or server TLS
        options), connect with an L{MXConnectionCreator} and wait until the
        handshake completed or failed; then close everything.
        """
        if isinstance(server_tls, IssuedCertificate):
            server_tls = ServerTLS(server_tls)
        factory = _ServerFactory()
        port = reactor.listenSSL(0, factory, server_tls, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        if cache is not None:
            creator = cache.creator(hostname, mode)
        else:
            creator = MXConnectionCreator(hostname, _PKI.ca_pem if trust is None else trust, mode=mode)
        endpoint = endpoints.wrapClientTLS(
            creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        client = await endpoints.connectProtocol(endpoint, _ClientProtocol())
        await client.settled
        if client.reason is None:
            client.transport.loseConnection()
        await client.lost
        for proto in factory.protocols:
            await proto.lost
        return _Connection(creator, client, factory)


# name → (issue a certificate for a host, result type, verify error, reason)
_FAILURES: dict[str, tuple[Callable[[str], IssuedCertificate], ResultType, int | None, str | None]] = {
    "expired": (_PKI.expired, ResultType.CERTIFICATE_EXPIRED, 10, "X509_V_ERR_CERT_HAS_EXPIRED"),
    "not_yet_valid": (_PKI.not_yet_valid, ResultType.CERTIFICATE_EXPIRED, 9, "X509_V_ERR_CERT_NOT_YET_VALID"),
    "untrusted": (
        _PKI.untrusted,
        ResultType.CERTIFICATE_NOT_TRUSTED,
        20,
        "X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    ),
    "wrong_name": (lambda host: _PKI.valid("other.example.net"), ResultType.CERTIFICATE_HOST_MISMATCH, None, None),
}


class ConnectionTests(LoopbackTLSMixin, unittest.TestCase):
    """Handshakes against loopback TLS servers."""

    async def test_valid(self) -> None:
        """
        A valid certificate for the MX host verifies; version, cipher and
        names are recorded; the server saw the MX host as SNI.
        """
        conn = await self.connect(_PKI.valid(MX, "mx2.example.com"), VerifyMode.VERIFY)
        outcome = conn.outcome
        self.assertTrue(conn.client.completed)
        self.assertTrue(outcome.verified)
        self.assertEqual(outcome.tls_version, "TLSv1.3")
        self.assertTrue(outcome.cipher)
        self.assertEqual(outcome.peer_certificate_names, (MX, "mx2.example.com"))
        self.assertEqual(outcome.verify_errors, ())
        self.assertIsNone(outcome.classify())
        self.assertIsNone(outcome.failure_details("127.0.0.1"))
        self.assertEqual(conn.server.protocols[0].sni, MX)

    async def test_tls12(self) -> None:
        """TLS 1.2 is accepted and recorded."""
        conn = await self.connect(
            ServerTLS(_PKI.valid(MX), max_version=SSL.TLS1_2_VERSION), VerifyMode.VERIFY
        )
        self.assertTrue(conn.outcome.verified)
        self.assertEqual(conn.outcome.tls_version, "TLSv1.2")
        self.assertEqual(conn.server.protocols[0].version, "TLSv1.2")

    async def test_hostname_normalised(self) -> None:
        """A trailing dot and upper case are dropped for SNI and the check."""
        conn = await self.connect(_PKI.valid(MX), VerifyMode.VERIFY, hostname="MX.Example.COM.")
        self.assertTrue(conn.outcome.verified)
        self.assertEqual(conn.outcome.hostname, MX)
        self.assertEqual(conn.server.protocols[0].sni, MX)

    async def test_ca_file(self) -> None:
        """Trust roots can come from a PEM file (C{--ca-file})."""
        path = _PKI.write_ca_file(self.mktemp())  # type: ignore[attr-defined]
        conn = await self.connect(_PKI.valid(MX), VerifyMode.VERIFY, trust=path)
        self.assertTrue(conn.outcome.verified)

    async def test_other_roots_do_not_trust(self) -> None:
        """With other trust roots, our CA's certificate is not trusted."""
        other = PKI()
        conn = await self.connect(_PKI.valid(MX), VerifyMode.VERIFY, trust=other.ca_pem)
        self.assertEqual(conn.outcome.classify()[0], ResultType.CERTIFICATE_NOT_TRUSTED)

    async def check_record_only(self, name: str) -> None:
        issue, result_type, errnum, reason = _FAILURES[name]
        conn = await self.connect(issue(MX), VerifyMode.RECORD_ONLY)
        outcome = conn.outcome
        self.assertTrue(conn.client.completed, "record-only must complete the handshake")
        self.assertIsNone(conn.client.reason.check(TLSVerificationError))
        self.assertTrue(outcome.handshake_completed)
        self.assertIsNotNone(outcome.tls_version)
        self.assertFalse(outcome.verified)
        self.assertEqual(outcome.classify(), (result_type, reason))
        if errnum is not None:
            self.assertIn(errnum, outcome.verify_errors)
        self.assertEqual(outcome.host_mismatch, errnum is None)
        self.assertEqual(
            outcome.failure_details("127.0.0.1"),
            FailureDetails(
                result_type=result_type,
                receiving_mx_hostname=MX,
                receiving_ip="127.0.0.1",
                failure_reason_code=reason,
            ),
        )

    async def check_verify(self, name: str) -> None:
        issue, result_type, errnum, reason = _FAILURES[name]
        conn = await self.connect(issue(MX), VerifyMode.VERIFY)
        self.assertFalse(conn.client.completed, "verify mode must fail the handshake")
        error = conn.client.reason.value
        self.assertIsInstance(error, TLSVerificationError)
        self.assertEqual(error.outcome.classify(), (result_type, reason))
        self.assertIn(result_type.value, str(error))
        outcome = conn.outcome
        self.assertFalse(outcome.handshake_completed)
        self.assertIsNone(outcome.tls_version)
        self.assertEqual(outcome.classify(), (result_type, reason))
        self.assertEqual(outcome.verify_errors, () if errnum is None else (errnum,))
        self.assertIsNone(conn.server.protocols[0].version)

    async def test_record_only_expired(self) -> None:
        """Record-only: an expired certificate → certificate-expired (10)."""
        await self.check_record_only("expired")

    async def test_record_only_not_yet_valid(self) -> None:
        """Record-only: a not-yet-valid certificate → certificate-expired (9)."""
        await self.check_record_only("not_yet_valid")

    async def test_record_only_untrusted(self) -> None:
        """Record-only: an unknown CA → certificate-not-trusted."""
        await self.check_record_only("untrusted")

    async def test_record_only_wrong_name(self) -> None:
        """
        Record-only: a certificate for another name → certificate-host-mismatch.

        This also pins that our per-connection verify callback replaces the
        one C{optionsForClientTLS} installs (Twisted 26.4+ checks the name
        there; older Twisted, in a Context info callback that ours overrides):
        if Twisted checked the name elsewhere, this handshake
        would fail.
        """
        await self.check_record_only("wrong_name")

    async def test_verify_expired(self) -> None:
        """Verify: an expired certificate fails the connection."""
        await self.check_verify("expired")

    async def test_verify_not_yet_valid(self) -> None:
        """Verify: a not-yet-valid certificate fails the connection."""
        await self.check_verify("not_yet_valid")

    async def test_verify_untrusted(self) -> None:
        """Verify: an unknown CA fails the connection."""
        await self.check_verify("untrusted")

    async def test_verify_wrong_name(self) -> None:
        """Verify: a certificate for another name fails the connection."""
        await self.check_verify("wrong_name")

    async def test_untrusted_and_wrong_name(self) -> None:
        """Both modes record both problems; the chain's wins."""
        for mode in (VerifyMode.VERIFY, VerifyMode.RECORD_ONLY):
            conn = await self.connect(_PKI.untrusted("other.example.net"), mode)
            self.assertTrue(conn.outcome.host_mismatch)
            self.assertEqual(conn.outcome.classify()[0], ResultType.CERTIFICATE_NOT_TRUSTED)

    async def test_tls11_refused(self) -> None:
        """
        A server that only speaks TLS 1.1 is refused (TLS >= 1.2), though the
        same server completes a handshake with a client allowing TLS 1.1.
        """
        server = TLS11OnlyServer(_PKI.valid(MX))
        self.assertEqual(_memory_handshake(server.context, SSL.TLS1_1_VERSION), "TLSv1.1")
        for mode in (VerifyMode.VERIFY, VerifyMode.RECORD_ONLY):
            conn = await self.connect(server, mode)
            outcome = conn.outcome
            self.assertFalse(conn.client.completed)
            self.assertFalse(outcome.handshake_completed)
            self.assertIsNone(outcome.tls_version)
            self.assertIn("received:protocol-version", outcome.alerts)
            self.assertEqual(
                outcome.classify(), (ResultType.VALIDATION_FAILURE, "tls-alert-protocol-version")
            )

    async def test_recorder_per_connection(self) -> None:
        """Each connection made by one creator gets its own recorder."""
        server = _ServerFactory()
        port = reactor.listenSSL(0, server, ServerTLS(_PKI.valid(MX)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        creator = MXConnectionCreator(MX, _PKI.ca_pem)
        for _ in range(2):
            endpoint = endpoints.wrapClientTLS(
                creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            )
            client = await endpoints.connectProtocol(endpoint, _ClientProtocol())
            await client.settled
            client.transport.loseConnection()
            await client.lost
        for proto in server.protocols:
            await proto.lost
        self.assertEqual(len(creator.recorders), 2)
        self.assertIsNot(creator.recorders[0], creator.recorders[1])
        self.assertIs(creator.recorder, creator.recorders[1])
        self.assertTrue(all(r.outcome().verified for r in creator.recorders))


class OptionsCacheTests(LoopbackTLSMixin, unittest.TestCase):
    """
    L{MXTLSOptionsCache}: one OpenSSL context per MX host, shared by its
    connections, and verification per connection as strict as without it.
    """

    def setUp(self) -> None:
        self.built: list[str] = []
        real = tls_module.ssl.optionsForClientTLS

        def counting(hostname: str, *args: Any, **kwargs: Any) -> Any:
            self.built.append(hostname)
            return real(hostname, *args, **kwargs)

        self.patch(tls_module.ssl, "optionsForClientTLS", counting)
        self.cache = MXTLSOptionsCache(_PKI.ca_pem)

    async def test_shared_and_strict(self) -> None:
        """
        Valid, wrong-name, expired and untrusted servers through one cache,
        in both modes: each connection is classified as with a fresh
        creator, and the options were built once per host name.
        """
        valid = _PKI.valid(MX)
        for mode in (VerifyMode.VERIFY, VerifyMode.RECORD_ONLY, VerifyMode.VERIFY):
            conn = await self.connect(valid, mode, cache=self.cache)
            self.assertTrue(conn.outcome.verified)
            self.assertTrue(conn.client.completed)
            self.assertEqual(conn.server.protocols[0].sni, MX)
        for name in ("wrong_name", "expired", "untrusted"):
            issue, result_type, _, _ = _FAILURES[name]
            for mode in (VerifyMode.VERIFY, VerifyMode.RECORD_ONLY):
                conn = await self.connect(issue(MX), mode, cache=self.cache)
                self.assertFalse(conn.outcome.verified, name)
                self.assertEqual(conn.outcome.classify()[0], result_type, name)
                self.assertEqual(conn.client.completed, mode is VerifyMode.RECORD_ONLY, name)
        # The name checked is the creator's host, not the first cached one.
        conn = await self.connect(valid, VerifyMode.VERIFY, hostname="mx2.example.com", cache=self.cache)
        self.assertEqual(conn.outcome.classify()[0], ResultType.CERTIFICATE_HOST_MISMATCH)
        self.assertFalse(conn.client.completed)
        conn = await self.connect(valid, VerifyMode.VERIFY, cache=self.cache)
        self.assertTrue(conn.outcome.verified)
        self.assertEqual(self.built, [MX, "mx2.example.com"])

    def test_lru_bound(self) -> None:
        """At most C{max_hosts} host names are kept, least recently used dropped."""
        cache = MXTLSOptionsCache(_PKI.ca_pem, max_hosts=2)
        a = cache.options("a.example")
        cache.options("b.example")
        self.assertIs(cache.options("a.example"), a)
        cache.options("c.example")  # drops b
        self.assertIs(cache.options("a.example"), a)
        cache.options("b.example")
        self.assertEqual(self.built, ["a.example", "b.example", "c.example", "b.example"])

    def test_trust_root_or_cache(self) -> None:
        """A creator takes its trust root from the cache, never both."""
        self.assertRaises(ValueError, MXConnectionCreator, MX, _PKI.ca_pem, cache=self.cache)
        self.assertRaises(ValueError, self.cache.creator, "127.0.0.1")


def _memory_handshake(server_context: SSL.Context, client_minimum: int) -> str:
    """Handshake in memory with a permissive pyOpenSSL client."""
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_min_proto_version(client_minimum)
    client_context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    return client.get_protocol_version_name()


class ValueTests(unittest.TestCase):
    """Classification, helpers and trust roots without the network."""

    def test_interface(self) -> None:
        """The creator provides IOpenSSLClientConnectionCreator."""
        creator = MXConnectionCreator(MX, _PKI.ca_pem)
        self.assertTrue(verifyObject(interfaces.IOpenSSLClientConnectionCreator, creator))
        self.assertIsNone(creator.outcome())
        # The abort path relies on this public TLSMemoryBIOProtocol method.
        self.assertTrue(callable(TLSMemoryBIOProtocol.failVerification))

    def test_ip_literal_refused(self) -> None:
        """An MX host is a name (RFC 8461 §4.1): IP literals are refused."""
        for literal in ("127.0.0.1", "::1"):
            self.assertRaises(ValueError, MXConnectionCreator, literal, _PKI.ca_pem)

    def outcome(self, **kwargs: Any) -> TLSOutcome:
        base: dict[str, Any] = dict(
            hostname=MX,
            mode=VerifyMode.RECORD_ONLY,
            handshake_completed=True,
            tls_version="TLSv1.3",
            certificate_checked=True,
        )
        base.update(kwargs)
        return TLSOutcome(**base)

    def test_priority(self) -> None:
        """Not trusted beats expired beats other chain errors beats the name."""
        self.assertEqual(
            self.outcome(verify_errors=(10, 21), host_mismatch=True).classify(),
            (ResultType.CERTIFICATE_NOT_TRUSTED, "X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE"),
        )
        self.assertEqual(
            self.outcome(verify_errors=(23, 9)).classify(),
            (ResultType.CERTIFICATE_EXPIRED, "X509_V_ERR_CERT_NOT_YET_VALID"),
        )
        self.assertEqual(
            self.outcome(verify_errors=(23,), host_mismatch=True).classify(),
            (ResultType.VALIDATION_FAILURE, "X509_V_ERR_CERT_REVOKED"),
        )

    def test_not_trusted_codes(self) -> None:
        """Verify errors 2, 18, 19, 20, 21, 27 are certificate-not-trusted."""
        for errnum in (2, 18, 19, 20, 21, 27):
            self.assertEqual(
                self.outcome(verify_errors=(errnum,)).classify(),
                (ResultType.CERTIFICATE_NOT_TRUSTED, verify_error_name(errnum)),
            )
        self.assertEqual(verify_error_name(27), "X509_V_ERR_CERT_UNTRUSTED")
        self.assertEqual(verify_error_name(99999), "x509-verify-error-99999")

    def test_not_verified_without_check(self) -> None:
        """No certificate check or an unfinished handshake is never verified."""
        self.assertTrue(self.outcome().verified)
        self.assertFalse(self.outcome(certificate_checked=False).verified)
        self.assertEqual(
            self.outcome(handshake_completed=False, tls_version=None).classify(),
            (ResultType.VALIDATION_FAILURE, "tls-handshake-failure"),
        )
        self.assertFalse(self.outcome(internal_error=True).verified)

    def test_starttls_details(self) -> None:
        """STARTTLS not offered or refused → starttls-not-supported."""
        self.assertEqual(
            starttls_not_supported_details(MX, "192.0.2.1"),
            FailureDetails(
                result_type=ResultType.STARTTLS_NOT_SUPPORTED,
                receiving_mx_hostname=MX,
                receiving_ip="192.0.2.1",
                failure_reason_code="starttls-not-offered",
            ),
        )
        self.assertEqual(
            starttls_not_supported_details(MX, reply_code=454).failure_reason_code,
            "starttls-refused-454",
        )

    def test_mx_mismatch_details(self) -> None:
        """An MX host outside the policy → validation-failure."""
        details = mx_mismatch_details("mx.evil.example", "192.0.2.2")
        self.assertEqual(
            details.to_json(),
            {
                "result-type": "validation-failure",
                "receiving-mx-hostname": "mx.evil.example",
                "receiving-ip": "192.0.2.2",
                "failed-session-count": 1,
                "failure-reason-code": "mtasts-policy-mx-mismatch",
            },
        )

    def test_load_trust_root(self) -> None:
        """PEM bytes, a path, a Certificate; passthrough; garbage fails."""
        path = _PKI.write_ca_file(self.mktemp())
        for spec in (_PKI.ca_pem + PKI().ca_pem, path, _PKI.trust_root()):
            root = load_trust_root(spec)
            self.assertTrue(IOpenSSLTrustRoot.providedBy(root), spec)
        marker = object()
        self.assertIs(load_trust_root(marker), marker)
        self.assertRaises(ValueError, load_trust_root, b"not a certificate")


class STARTTLSTests(unittest.TestCase):
    """The creator as twisted.mail's ESMTP client context, over STARTTLS."""

    timeout = 30

    async def send(self, behaviour: Behaviour, mode: VerifyMode) -> tuple[SMTPTestServer, MXConnectionCreator, Any]:
        server = SMTPTestServer(behaviour, reactor=reactor)
        server.start()
        self.addCleanup(server.stop)
        creator = MXConnectionCreator(MX, _PKI.ca_pem, mode=mode)
        done: defer.Deferred[Any] = defer.Deferred()
        factory = ClosingSenderFactory(
            None,
            None,
            "a@example.org",
            ["b@example.com"],
            io.BytesIO(b"Subject: t\r\n\r\nbody\r\n"),
            done,
            retries=0,
            contextFactory=creator,
            requireAuthentication=False,
            requireTransportSecurity=True,
        )
        reactor.connectTCP(server.host, server.port, factory)
        try:
            result: Any = await done
        except Exception:
            result = Failure()
        await factory.closed
        return server, creator, result

    async def test_verified_delivery(self) -> None:
        """A verified STARTTLS session delivers; nothing went in plaintext."""
        server, creator, result = await self.send(Behaviour(certificate=_PKI.valid(MX)), VerifyMode.VERIFY)
        self.assertEqual(result[0], 1)
        self.assertTrue(creator.outcome().verified)
        [message] = server.messages
        self.assertTrue(message.tls)
        self.assertEqual(message.sni, MX)
        self.assertEqual(server.plaintext_transactions(), [])

    async def test_verify_failure(self) -> None:
        """
        Verify mode: an expired certificate fails the send; the error's
        cause carries the outcome, and the server received nothing.
        """
        server, creator, result = await self.send(Behaviour(certificate=_PKI.expired(MX)), VerifyMode.VERIFY)
        self.assertIsInstance(result, Failure)
        result.trap(smtp.SMTPConnectError)
        cause = result.value.__cause__
        self.assertIsInstance(cause, TLSVerificationError)
        self.assertEqual(cause.outcome.classify()[0], ResultType.CERTIFICATE_EXPIRED)
        self.assertEqual(creator.outcome().classify()[0], ResultType.CERTIFICATE_EXPIRED)
        self.assertEqual(server.messages, [])
        self.assertEqual(server.plaintext_transactions(), [])
        self.assertEqual([c.verb for c in server.sessions[0].commands], ["EHLO", "STARTTLS"])

    async def test_record_only_delivers(self) -> None:
        """Record-only: a wrong-name certificate still delivers, recorded."""
        server, creator, result = await self.send(
            Behaviour(certificate=_PKI.valid("other.example.net")), VerifyMode.RECORD_ONLY
        )
        self.assertEqual(result[0], 1)
        outcome = creator.outcome()
        self.assertFalse(outcome.verified)
        self.assertEqual(outcome.classify(), (ResultType.CERTIFICATE_HOST_MISMATCH, None))
        self.assertTrue(server.messages[0].tls)

    async def test_starttls_refused(self) -> None:
        """A 454 to STARTTLS fails with TLSError carrying the code; no TLS started."""
        server, creator, result = await self.send(
            Behaviour(certificate=_PKI.valid(MX), starttls=StartTLS.REFUSE), VerifyMode.VERIFY
        )
        result.trap(smtp.TLSError)
        self.assertEqual(result.value.code, 454)
        self.assertIsNone(creator.outcome())
        self.assertEqual(server.plaintext_transactions(), [])

    async def test_starttls_not_offered(self) -> None:
        """
        STARTTLS not offered while TLS is required: TLSRequiredError, and
        no TLS was attempted.
        """
        server, creator, result = await self.send(
            Behaviour(starttls=StartTLS.NOT_OFFERED), VerifyMode.VERIFY
        )
        result.trap(smtp.TLSRequiredError)
        self.assertIsNone(creator.outcome())
        self.assertEqual(server.plaintext_transactions(), [])
