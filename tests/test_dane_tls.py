"""
DANE authentication in the handshake (L{mtasts_twisted.tls} with
L{VerifyMode.DANE}, L{mtasts_twisted.pkix.VerifyRecorder} with a
L{DANECheck}): real STARTTLS over loopback through twisted.mail's ESMTP
client against the SMTP test server, asserting on the server side that
nothing reaches it unless the TLSA records authenticate it (RFC 7672 §3).
"""

from __future__ import annotations

import datetime
import io
from typing import Any

from cryptography import x509
from twisted.internet import defer, reactor
from twisted.mail import smtp
from twisted.python.failure import Failure
from twisted.trial import unittest

from mtasts_twisted.dns import TLSARecord
from mtasts_twisted.pkix import DANECheck, tlsa_association_data
from mtasts_twisted.results import ResultType
from mtasts_twisted.testing.pki import PKI, IssuedCertificate
from mtasts_twisted.testing.smtp import Behaviour, SMTPTestServer, StartTLS
from tests.clients import ClosingSenderFactory
from mtasts_twisted.tls import MXConnectionCreator, MXTLSOptionsCache, TLSVerificationError, VerifyMode

MX = "mx.example.com"
BASE = "mx.example.com"
DOMAIN = "example.com"
_PKI = PKI()


def record(usage: int, selector: int, mtype: int, certificate: x509.Certificate) -> TLSARecord:
    data = tlsa_association_data(certificate, selector, mtype)
    assert data is not None
    return TLSARecord(usage, selector, mtype, data)


def check(*records: TLSARecord, base: str = BASE) -> DANECheck:
    return DANECheck(records, (base, DOMAIN))


class DANESTARTTLSTests(unittest.TestCase):
    timeout = 30

    async def send(
        self, behaviour: Behaviour, dane: DANECheck, server_name: str | None = None
    ) -> tuple[SMTPTestServer, MXConnectionCreator, Any]:
        server = SMTPTestServer(behaviour, reactor=reactor)
        server.start()
        self.addCleanup(server.stop)
        # The trust root is the WebPKI test CA: DANE must neither need nor
        # heed it.
        creator = MXConnectionCreator(MX, _PKI.ca_pem, mode=VerifyMode.DANE, dane=dane, server_name=server_name)
        done: defer.Deferred[Any] = defer.Deferred()
        factory = ClosingSenderFactory(
            None, None, "a@example.org", ["b@example.com"], io.BytesIO(b"Subject: t\r\n\r\nbody\r\n"), done,
            retries=0, contextFactory=creator, requireAuthentication=False, requireTransportSecurity=True,
        )
        reactor.connectTCP(server.host, server.port, factory)
        try:
            result: Any = await done
        except Exception:
            result = Failure()
        await factory.closed
        return server, creator, result

    def assert_delivered(self, server: SMTPTestServer, creator: MXConnectionCreator, result: Any) -> None:
        self.assertNotIsInstance(result, Failure)
        self.assertEqual(result[0], 1)
        outcome = creator.outcome()
        assert outcome is not None
        self.assertTrue(outcome.verified)
        self.assertIsNone(outcome.classify())
        [message] = server.messages
        self.assertTrue(message.tls)
        self.assertEqual(server.plaintext_transactions(), [])

    def assert_refused(
        self, server: SMTPTestServer, creator: MXConnectionCreator, result: Any, result_type: ResultType, reason: str
    ) -> None:
        """The handshake was aborted: nothing reached the server, in TLS or plaintext."""
        self.assertIsInstance(result, Failure)
        result.trap(smtp.SMTPConnectError)
        cause = result.value.__cause__
        self.assertIsInstance(cause, TLSVerificationError)
        self.assertEqual(cause.outcome.classify(), (result_type, reason))
        outcome = creator.outcome()
        assert outcome is not None
        self.assertFalse(outcome.verified)
        self.assertFalse(outcome.handshake_completed)
        self.assertEqual(server.messages, [])
        self.assertEqual(server.plaintext_transactions(), [])
        self.assertEqual([c.verb for c in server.sessions[0].commands], ["EHLO", "STARTTLS"])

    async def test_dane_ee_self_signed(self) -> None:
        """
        RFC 7672 §3.1.1: a self-signed, expired certificate for another
        name, matching a DANE-EE(3) record: delivered, with SNI the TLSA
        base domain (§8.1).
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        issued = _PKI.self_signed("other.example", not_before=now - datetime.timedelta(days=30),
                                  not_after=now - datetime.timedelta(days=1))
        leaf = issued.certificates()[0]
        server, creator, result = await self.send(
            Behaviour(certificate=issued), check(record(3, 1, 1, leaf), base="base.example.net"),
            server_name="base.example.net")
        self.assert_delivered(server, creator, result)
        self.assertEqual(server.messages[0].sni, "base.example.net")
        outcome = creator.outcome()
        assert outcome is not None and outcome.dane_verdict is not None
        self.assertEqual(outcome.dane_verdict.reason, "dane-ee")
        # OpenSSL's PKIX errors were seen, and decided nothing.
        self.assertTrue(outcome.verify_errors)
        self.assertEqual(outcome.hostname, MX)

    async def test_dane_ee_mismatch_with_a_webpki_valid_certificate(self) -> None:
        """
        A certificate MTA-STS would accept (trusted CA, right name) but no
        TLSA record matches: the handshake is aborted, nothing is sent.
        """
        other = _PKI.self_signed(MX).certificates()[0]
        server, creator, result = await self.send(
            Behaviour(certificate=_PKI.valid(MX)), check(record(3, 1, 1, other)))
        self.assert_refused(server, creator, result, ResultType.TLSA_INVALID, "tlsa-no-match")

    async def test_dane_ta(self) -> None:
        """RFC 7672 §3.1.2: a chain to the DANE-TA(2) anchor, with the MX host's name."""
        server, creator, result = await self.send(
            Behaviour(certificate=_PKI.dane_issued(MX)), check(record(2, 0, 1, _PKI.dane_root)))
        self.assert_delivered(server, creator, result)
        outcome = creator.outcome()
        assert outcome is not None and outcome.dane_verdict is not None
        self.assertEqual((outcome.dane_verdict.reason, outcome.dane_verdict.depth), ("dane-ta", 2))

    async def test_dane_ta_name_mismatch(self) -> None:
        server, creator, result = await self.send(
            Behaviour(certificate=_PKI.dane_issued("mx.other.example")), check(record(2, 0, 1, _PKI.dane_root)))
        self.assert_refused(server, creator, result, ResultType.CERTIFICATE_HOST_MISMATCH, "dane-ta-name-mismatch")

    async def test_dane_ta_anchor_not_presented(self) -> None:
        """RFC 7672 §3.1.2: the server must present the anchor; without it, no match."""
        issued: IssuedCertificate = _PKI.dane_issued(MX, include_root=False)
        server, creator, result = await self.send(Behaviour(certificate=issued),
                                                  check(record(2, 0, 1, _PKI.dane_root)))
        self.assert_refused(server, creator, result, ResultType.TLSA_INVALID, "tlsa-no-match")

    async def test_no_starttls(self) -> None:
        """TLSA records promise TLS (RFC 7672 §2.2): no STARTTLS, no delivery, nothing in plaintext."""
        server, creator, result = await self.send(
            Behaviour(starttls=StartTLS.NOT_OFFERED), check(record(3, 1, 1, _PKI.dane_root)))
        result.trap(smtp.TLSRequiredError)
        self.assertIsNone(creator.outcome())
        self.assertEqual(server.messages, [])
        self.assertEqual(server.plaintext_transactions(), [])


class CreatorTests(unittest.SynchronousTestCase):
    def test_dane_goes_with_a_check(self) -> None:
        """DANE mode without records to check (or records without DANE mode) is refused."""
        dane = check(TLSARecord(3, 1, 1, b"\x00" * 32))
        self.assertRaises(ValueError, MXConnectionCreator, MX, _PKI.ca_pem, mode=VerifyMode.DANE)
        self.assertRaises(ValueError, MXConnectionCreator, MX, _PKI.ca_pem, mode=VerifyMode.VERIFY, dane=dane)
        self.assertRaises(ValueError, DANECheck, (), (MX,))
        cache = MXTLSOptionsCache(_PKI.ca_pem)
        creator = cache.creator(MX, VerifyMode.DANE, dane=dane, server_name="Base.Example.")
        self.assertEqual((creator.server_name, creator.hostname, creator.dane), ("base.example", MX, dane))
        self.assertEqual(cache.creator(MX).server_name, MX)


class _FakeTLSProtocol:
    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def failVerification(self, reason: Failure) -> None:
        self.failures.append(reason)


class _FakeConnection:
    def set_verify(self, mode: int, callback: Any) -> None:
        pass

    def set_info_callback(self, callback: Any) -> None:
        pass

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_128_GCM_SHA256"


class HandshakeGuardTests(unittest.SynchronousTestCase):
    def test_handshake_done_without_a_dane_check_is_refused(self) -> None:
        """
        Should a handshake ever complete without the server certificate's
        verify call (no certificate checked), DANE refuses the connection
        rather than letting it carry mail unauthenticated.
        """
        from OpenSSL import SSL

        from mtasts_twisted.tls import TLSOutcomeRecorder

        recorder = TLSOutcomeRecorder(MX, VerifyMode.DANE, check(TLSARecord(3, 1, 1, b"\x00" * 32)))
        protocol = _FakeTLSProtocol()
        recorder._attach(_FakeConnection(), protocol)  # type: ignore[arg-type]
        recorder._info(_FakeConnection(), SSL.SSL_CB_HANDSHAKE_DONE, 1)  # type: ignore[arg-type]
        self.assertEqual(len(protocol.failures), 1)
        self.assertIsInstance(protocol.failures[0].value, TLSVerificationError)
        self.assertFalse(recorder.outcome().verified)
