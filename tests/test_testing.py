"""
Tests for the shipped test helpers (L{mtasts_twisted.testing}): every fake
provides the interface it stands in for (C{verifyObject}), and L{ListSink}
keeps what it is given.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.interfaces import IHostnameResolver, IOpenSSLServerConnectionCreator
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from mtasts_twisted.delivery import Deliverer
from mtasts_twisted.fetch import PolicyFetcher
from mtasts_twisted.interfaces import IDeliverer, IDNSResolver, IPolicyFetcher, IResultSink, IShelf, IStore
from mtasts_twisted.metrics import MeteredDeliverer, MeteredFetcher, ServiceStats
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.testing.https import StaticHostnameResolver
from mtasts_twisted.testing.memory import FakeFetcher, FakeResolver, MemoryShelf, MemoryStore
from mtasts_twisted.testing.pki import PKI
from mtasts_twisted.testing.sinks import ListSink
from mtasts_twisted.testing.smtp import ServerTLS, TLS11OnlyServer
from mtasts_twisted.tlsrpt.aggregate import NULL_SINK, NullResultSink

_PKI = PKI()


def _result(domain: str, successes: int = 0, failures: int = 0) -> Result:
    return Result(
        policy=PolicyDescriptor(PolicyType.STS, domain, ("version: STSv1",), ("mx.example",)),
        success_count=successes,
        failures=[FailureDetails(ResultType.CERTIFICATE_EXPIRED)] * failures,
    )


class FakesProvideTheirInterfacesTests(SynchronousTestCase):
    """Every shipped fake passes C{verifyObject} for the interface it fakes."""

    def test_fake_resolver(self) -> None:
        self.assertTrue(verifyClass(IDNSResolver, FakeResolver))
        self.assertTrue(verifyObject(IDNSResolver, FakeResolver()))

    def test_memory_store(self) -> None:
        store = MemoryStore()
        self.assertTrue(verifyObject(IStore, store))
        self.assertTrue(verifyObject(IShelf, store.shelf("policies")))
        self.assertTrue(verifyObject(IShelf, MemoryShelf("results")))

    def test_list_sink(self) -> None:
        self.assertTrue(verifyClass(IResultSink, ListSink))
        self.assertTrue(verifyObject(IResultSink, ListSink()))

    def test_null_sink(self) -> None:
        self.assertTrue(verifyObject(IResultSink, NullResultSink()))
        self.assertTrue(verifyObject(IResultSink, NULL_SINK))

    def test_static_hostname_resolver(self) -> None:
        self.assertTrue(verifyObject(IHostnameResolver, StaticHostnameResolver({"a.example": "127.0.0.1"})))

    def test_server_tls(self) -> None:
        issued = _PKI.valid("mx.example")
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, ServerTLS(issued)))
        self.assertTrue(verifyObject(IOpenSSLServerConnectionCreator, TLS11OnlyServer(issued)))

    def test_fetchers(self) -> None:
        """
        The fake fetcher, the real one and its metered wrapper provide the
        policy cache's seam, L{IPolicyFetcher}.
        """
        real = PolicyFetcher(reactor)
        self.assertTrue(verifyObject(IPolicyFetcher, FakeFetcher()))
        self.assertTrue(verifyObject(IPolicyFetcher, real))
        self.assertTrue(verifyObject(IPolicyFetcher, MeteredFetcher(real, ServiceStats())))

    def test_deliverers(self) -> None:
        """L{Deliverer} and its metered wrapper provide L{IDeliverer}, the relay's seam."""
        deliverer = Deliverer(reactor, FakeResolver(), None)
        self.assertTrue(verifyObject(IDeliverer, deliverer))
        self.assertTrue(verifyObject(IDeliverer, MeteredDeliverer(deliverer, ServiceStats())))


class PKITests(SynchronousTestCase):
    """L{PKI} hands OpenSSL C{cryptography} objects, not pyOpenSSL's deprecated ones."""

    def test_server_options_warn_nothing(self) -> None:
        issued = _PKI.valid("a.example")
        context = issued.server_options().getContext()
        self.assertIsNotNone(context)
        self.assertEqual(self.flushWarnings(), [])

    def test_certificates_and_key(self) -> None:
        issued = _PKI.valid("a.example")
        [leaf] = issued.certificates()
        self.assertEqual(leaf.public_key(), issued.private_key().public_key())
        self.assertIn(b"BEGIN CERTIFICATE", issued.chain_pem)


class ListSinkTests(SynchronousTestCase):
    """L{ListSink} records results, in order, with their times."""

    def test_empty(self) -> None:
        sink = ListSink()
        self.assertEqual((sink.results, sink.times), ([], []))

    def test_records_in_order(self) -> None:
        sink = ListSink()
        first, second = _result("a.example", successes=1), _result("b.example", failures=2)
        sink.record(first)
        sink.record(second, when=1_700_000_000.5)
        sink.record(first, 12)
        self.assertEqual(sink.results, [first, second, first])
        self.assertEqual(sink.times, [None, 1_700_000_000.5, 12])
        self.assertEqual([r.failure_count for r in sink.results], [0, 2, 0])

    def test_records_through_the_interface(self) -> None:
        sink = ListSink()
        provider: IResultSink = IResultSink(sink)
        result = _result("a.example")
        self.assertIsNone(provider.record(result))
        self.assertEqual(sink.results, [result])

    def test_sinks_are_independent(self) -> None:
        one, other = ListSink(), ListSink()
        one.record(_result("a.example"))
        self.assertEqual(other.results, [])
