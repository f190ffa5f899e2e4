"""
Tests for L{mtasts_twisted.pkix}: the one trust-root loader, the one
verify-error table, and the recording verify callback (unit, and over real
TLS on loopback).
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import crypto
from twisted.internet import defer, endpoints, interfaces, protocol, reactor
from twisted.internet._sslverify import IOpenSSLTrustRoot  # only exported there
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtasts_twisted.pkix import (
    EXPIRED_ERRORS,
    NOT_TRUSTED_ERRORS,
    CertificateVerifyError,
    RecordingConnectionCreator,
    VerifyErrorClass,
    VerifyRecorder,
    classify_verify_error,
    client_context,
    deciding_verify_error,
    load_trust_roots,
    verify_error_name,
)
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.pki import PKI, IssuedCertificate

_PKI = PKI()
HOST = "mta-sts.example.com"


def _key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class LoadTrustRootsTests(SynchronousTestCase):
    """One loader for C{--ca-file}, the policy fetch, MX hosts and reports."""

    def assertRoots(self, spec: Any, count: int | None = None) -> None:
        root = load_trust_roots(spec)
        self.assertTrue(IOpenSSLTrustRoot.providedBy(root), spec)
        if count is not None:
            self.assertEqual(len(root._caCerts), count)  # type: ignore[attr-defined]

    def test_inputs(self) -> None:
        """PEM bytes, a path, a Certificate, the platform's; others pass through."""
        self.assertRoots(_PKI.ca_pem + PKI().ca_pem, 2)
        self.assertRoots(_PKI.write_ca_file(self.mktemp()), 1)
        self.assertRoots(_PKI.trust_root())
        self.assertRoots(None)
        marker = object()
        self.assertIs(load_trust_roots(marker), marker)  # type: ignore[arg-type]

    def test_rfc7468_lax(self) -> None:
        """
        What RFC 7468 lets a parser accept is accepted: text around the
        blocks, other blocks (keys), CRLF, whitespace within the base64, and
        the legacy C{X509 CERTIFICATE} label.
        """
        pem = _PKI.ca_pem
        self.assertRoots(b"# our CA\n" + _key_pem() + pem + b"trailing text\n", 1)
        self.assertRoots(pem.replace(b"\n", b"\r\n"), 1)
        self.assertRoots(pem.replace(b"\n", b"\n  "), 1)
        self.assertRoots(pem.replace(b" CERTIFICATE-----", b" X509 CERTIFICATE-----"), 1)

    def test_strict(self) -> None:
        """
        No certificate, a damaged one or a truncated one is an error (one
        line, as C{--ca-file}'s usage error must be), never fewer roots.
        """
        pem = _PKI.ca_pem
        bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        trusted_only = pem.replace(b" CERTIFICATE-----", b" TRUSTED CERTIFICATE-----")
        for spec in (
            b"",
            b"not a certificate",
            _key_pem(),
            trusted_only,
            bad,
            pem + bad,
            pem + pem[: len(pem) // 2],
            pem.replace(b"-----END CERTIFICATE-----", b""),
            pem.replace(b"-----END", b"garbage!\n-----END"),
        ):
            error = self.assertRaises(ValueError, load_trust_roots, spec)
            self.assertIn("trust roots", str(error))
            self.assertNotIn("\n", str(error))
        self.assertRaises(OSError, load_trust_roots, self.mktemp())


class VerifyErrorTests(SynchronousTestCase):
    """The one OpenSSL verify error → RFC 8460 table."""

    def test_table(self) -> None:
        self.assertEqual(EXPIRED_ERRORS, {9, 10})
        self.assertEqual(NOT_TRUSTED_ERRORS, {2, 18, 19, 20, 21, 27})
        for code in EXPIRED_ERRORS:
            self.assertEqual(classify_verify_error(code).result_type, ResultType.CERTIFICATE_EXPIRED)
        for code in NOT_TRUSTED_ERRORS:
            self.assertEqual(classify_verify_error(code).result_type, ResultType.CERTIFICATE_NOT_TRUSTED)
        other = classify_verify_error(23)
        self.assertEqual(other, VerifyErrorClass("validation-failure", "X.509 verify error 23"))
        self.assertEqual(other.result_type, ResultType.VALIDATION_FAILURE)
        self.assertEqual(classify_verify_error(10), ("certificate-expired", "certificate has expired"))

    def test_names(self) -> None:
        self.assertEqual(verify_error_name(10), "X509_V_ERR_CERT_HAS_EXPIRED")
        self.assertEqual(verify_error_name(99999), "x509-verify-error-99999")

    def test_deciding(self) -> None:
        """Not trusted beats expired beats the first other error."""
        self.assertIsNone(deciding_verify_error([]))
        self.assertEqual(deciding_verify_error([10, 21]), 21)
        self.assertEqual(deciding_verify_error([23, 9, 10]), 9)
        self.assertEqual(deciding_verify_error([23, 24]), 23)


class _Protocol:
    """Stands for the TLSMemoryBIOProtocol a recorder tells of a refusal."""

    def __init__(self) -> None:
        self.reasons: list[Failure] = []

    def failVerification(self, reason: Failure) -> None:
        self.reasons.append(reason)


class _Connection:
    def set_verify(self, mode: int, callback: Any) -> None:
        self.callback = callback


def _leaf(issued: IssuedCertificate) -> crypto.X509:
    return crypto.load_certificate(crypto.FILETYPE_PEM, issued.chain_pem)


class VerifyRecorderTests(SynchronousTestCase):
    """The recording verify callback, called as OpenSSL would."""

    def recorder(self, enforce: bool, hostname: str = HOST) -> tuple[VerifyRecorder, _Protocol]:
        recorder = VerifyRecorder(hostname, enforce=enforce)
        proto = _Protocol()
        connection = _Connection()
        recorder.attach(connection, proto)  # type: ignore[arg-type]
        self.assertEqual(connection.callback, recorder.verify)
        return recorder, proto

    def test_passed(self) -> None:
        recorder, proto = self.recorder(True)
        leaf = _leaf(_PKI.valid(HOST, "other.example"))
        self.assertTrue(recorder.verify(None, leaf, 0, 0, 1))  # type: ignore[arg-type]
        self.assertTrue(recorder.passed)
        self.assertEqual(recorder.names, (HOST, "other.example"))
        self.assertIsNone(recorder.deciding_error())
        self.assertEqual(proto.reasons, [])

    def test_enforce_refuses_once(self) -> None:
        """The first failure refuses, with a reason that says why; once."""
        recorder, proto = self.recorder(True)
        leaf = _leaf(_PKI.expired(HOST))
        self.assertFalse(recorder.verify(None, leaf, 10, 0, 0))  # type: ignore[arg-type]
        self.assertFalse(recorder.verify(None, leaf, 10, 0, 0))  # type: ignore[arg-type]
        [reason] = proto.reasons
        error = reason.value
        self.assertIsInstance(error, CertificateVerifyError)
        self.assertEqual(
            str(error),
            f"TLS verification of {HOST} failed: certificate: certificate has expired (X.509 error 10)",
        )
        self.assertEqual(recorder.deciding_error(), (0, 10))
        self.assertFalse(recorder.passed)

    def test_record_only(self) -> None:
        """Without enforcing, every problem is recorded and the handshake goes on."""
        recorder, proto = self.recorder(False)
        leaf = _leaf(_PKI.untrusted("other.example"))
        self.assertTrue(recorder.verify(None, leaf, 20, 0, 0))  # type: ignore[arg-type]
        self.assertTrue(recorder.verify(None, leaf, 21, 0, 0))  # type: ignore[arg-type]
        self.assertEqual(recorder.errors, [(0, 20), (0, 21)])
        self.assertTrue(recorder.host_mismatch)
        self.assertEqual(recorder.deciding_error(), (0, 20))
        self.assertEqual(proto.reasons, [])

    def test_host_mismatch(self) -> None:
        recorder, proto = self.recorder(True)
        leaf = _leaf(_PKI.valid("mta-sts.other.example"))
        self.assertTrue(recorder.verify(None, leaf, 0, 1, 1))  # type: ignore[arg-type]
        self.assertFalse(recorder.verify(None, leaf, 0, 0, 1))  # type: ignore[arg-type]
        self.assertTrue(recorder.host_mismatch)
        self.assertEqual(
            recorder.describe(), f"certificate is not valid for {HOST} (names mta-sts.other.example)"
        )
        self.assertEqual(len(proto.reasons), 1)

    def test_internal_error(self) -> None:
        """Our code raising inside OpenSSL is logged, recorded, and refuses when enforcing."""
        for enforce in (True, False):
            recorder, proto = self.recorder(enforce)
            self.assertEqual(recorder.verify(None, object(), 0, 0, 1), not enforce)  # type: ignore[arg-type]
            self.assertTrue(recorder.internal_error)
            self.assertFalse(recorder.passed)
            self.assertEqual(len(proto.reasons), int(enforce))
            self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)


@implementer(interfaces.IHandshakeListener)
class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.completed = False
        self.reason: Failure | None = None
        self.settled: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.completed = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.reason = reason
        self.settled.callback(None)


@implementer(interfaces.IHandshakeListener)
class _Server(protocol.Protocol):
    def handshakeCompleted(self) -> None:
        self.factory.servernames.append(  # type: ignore[attr-defined]
            self.transport.getHandle().get_servername()  # type: ignore[union-attr]
        )


class RecordingConnectionCreatorTests(TestCase):
    """One context, a recorder per connection, over real TLS."""

    timeout = 30

    def setUp(self) -> None:
        self.context = client_context(load_trust_roots(_PKI.ca_pem))

    async def connect(self, issued: IssuedCertificate, hostname: str) -> tuple[RecordingConnectionCreator, _Client, list]:
        factory = protocol.Factory.forProtocol(_Server)
        factory.servernames = []  # type: ignore[attr-defined]
        port = reactor.listenSSL(0, factory, issued.server_options(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        creator = RecordingConnectionCreator(hostname, self.context)
        self.assertTrue(verifyObject(interfaces.IOpenSSLClientConnectionCreator, creator))
        endpoint = endpoints.wrapClientTLS(
            creator, endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        client = await endpoints.connectProtocol(endpoint, _Client())
        await client.settled
        return creator, client, factory.servernames  # type: ignore[attr-defined]

    async def test_verified(self) -> None:
        creator, client, servernames = await self.connect(_PKI.valid(HOST), HOST)
        self.assertTrue(client.completed)
        [recorder] = creator.recorders
        self.assertTrue(recorder.passed)
        self.assertEqual(servernames, [HOST.encode("ascii")])

    async def test_refused(self) -> None:
        """A refused certificate: the connection is lost with the reason recorded."""
        for issued, text in (
            (_PKI.expired(HOST), "certificate has expired (X.509 error 10)"),
            (_PKI.untrusted(HOST), "unable to get local issuer certificate (X.509 error 20)"),
            (_PKI.valid("mta-sts.other.example"), "not valid for mta-sts.example.com"),
        ):
            creator, client, _ = await self.connect(issued, HOST)
            self.assertFalse(client.completed)
            assert client.reason is not None
            error = client.reason.value
            self.assertIsInstance(error, CertificateVerifyError)
            self.assertIn(text, str(error))
            self.assertEqual(creator.recorders[0].describe(), error.detail)

    async def test_address_literal(self) -> None:
        """An address is checked as an IP-ID and sent no SNI (as Twisted does)."""
        creator, client, servernames = await self.connect(_PKI.valid("127.0.0.1"), "127.0.0.1")
        self.assertTrue(client.completed)
        self.assertTrue(creator.recorders[0].passed)
        self.assertEqual(servernames, [None])
        creator, client, _ = await self.connect(_PKI.valid(HOST), "127.0.0.1")
        self.assertFalse(client.completed)
        self.assertTrue(creator.recorders[0].host_mismatch)
