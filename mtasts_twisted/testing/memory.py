"""
In-memory fakes for unit tests of code above the DNS, fetch and store layers:
L{FakeResolver} (an L{IDNSResolver}) and L{FakeFetcher}, which count calls so
tests can assert how often the network would have been used, and
L{MemoryStore} (an L{IStore}).

L{MemoryStore} and L{MemoryShelf} are not fakes but the shipped in-memory
store (URL C{memory:}) of L{mtasts_twisted.store.memory}, re-exported here:
there is one implementation, and the store test mixin runs on it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mtasts_twisted.dns import (
    AddressAnswer,
    CNAMEAnswer,
    DNSNoRecordError,
    MXAnswer,
    MXHost,
    TLSAAnswer,
    TLSARecord,
    TXTAnswer,
)
from mtasts_twisted.fetch import FetchedPolicy
from mtasts_twisted.interfaces import IDNSResolver, IPolicyFetcher
from mtasts_twisted.policy import parse_policy
from mtasts_twisted.store import MemoryShelf, MemoryStore

__all__ = ["FakeFetcher", "FakeResolver", "MemoryShelf", "MemoryStore"]


@implementer(IDNSResolver)
class FakeResolver:
    """
    An L{IDNSResolver} answering from dicts.  A value may be an exception
    (raised) or a L{Deferred} (returned as is, so tests control timing).

    Answers and denials are DNSSEC-secure when C{secure} is set, or for a
    name in C{security} as that dict says (a per-name override)::

        resolver = FakeResolver(secure=True)
        resolver.mx["example.com"] = [(10, "mx.example.com")]
        resolver.addresses["mx.example.com"] = ["192.0.2.1"]
        resolver.tlsa["_25._tcp.mx.example.com"] = [(3, 1, 1, digest)]
        resolver.security["_25._tcp.mx.example.com"] = False  # insecure

    @ivar queries: a C{Counter} of C{(type, name)} asked.
    @ivar ttl: the TTL of every answer (0: callers must not reuse answers).
    @ivar secure: whether answers and denials are secure by default.
    @ivar security: per-name overrides of C{secure}.
    """

    def __init__(self, ttl: int = 300, secure: bool = False) -> None:
        self.ttl = ttl
        self.secure = secure
        self.security: dict[str, bool] = {}
        self.txt: dict[str, Any] = {}
        self.mx: dict[str, Any] = {}
        self.addresses: dict[str, Any] = {}
        self.tlsa: dict[str, Any] = {}
        self.cname: dict[str, Any] = {}
        self.queries: Counter = Counter()

    def is_secure(self, name: str) -> bool:
        """Whether the answer (or denial) for C{name} is secure."""
        return self.security.get(name, self.secure)

    def _answer(self, table: dict, kind: str, name: str, make: Callable[[Any], Any]) -> Deferred:
        self.queries[(kind, name)] += 1
        value = table.get(name)
        if value is None:
            return fail(DNSNoRecordError(f"no {kind} at {name}", name=name, rdtype=kind,
                                         secure=self.is_secure(name)))
        if isinstance(value, BaseException):
            return fail(value)
        if isinstance(value, Deferred):
            return value
        return succeed(make(value))

    def lookup_txt(self, name: str) -> Deferred:
        """See L{IDNSResolver.lookup_txt}; C{txt[name]} is a list of strings."""
        return self._answer(self.txt, "TXT", name, lambda v: TXTAnswer(
            name=name, strings=tuple(v), ttl=self.ttl, secure=self.is_secure(name)))

    def lookup_mx(self, domain: str) -> Deferred:
        """See L{IDNSResolver.lookup_mx}; C{mx[domain]} is a list of (preference, host)."""
        return self._answer(self.mx, "MX", domain, lambda v: MXAnswer(
            domain=domain, hosts=tuple(MXHost(p, h) for p, h in v), ttl=self.ttl, secure=self.is_secure(domain),
            implicit=False, null=False))

    def lookup_addresses(self, host: str) -> Deferred:
        """
        See L{IDNSResolver.lookup_addresses}; C{addresses[host]} is a list of
        IPs, or an L{AddressAnswer} returned as is (to give a C{canonical}).
        """
        return self._answer(self.addresses, "A/AAAA", host, lambda v: v if isinstance(v, AddressAnswer) else
                            AddressAnswer(host=host, addresses=tuple(v), ttl=self.ttl, secure=self.is_secure(host)))

    def lookup_tlsa(self, name: str) -> Deferred:
        """
        See L{IDNSResolver.lookup_tlsa}; C{tlsa[name]} is a list of
        C{(usage, selector, mtype, data)} (C{data}: bytes, or hex text) or
        of L{TLSARecord}s.
        """
        def make(value: Any) -> TLSAAnswer:
            records = tuple(
                r if isinstance(r, TLSARecord)
                else TLSARecord(r[0], r[1], r[2], bytes.fromhex(r[3]) if isinstance(r[3], str) else r[3])
                for r in value)
            return TLSAAnswer(name=name, records=records, ttl=self.ttl, secure=self.is_secure(name))
        return self._answer(self.tlsa, "TLSA", name, make)

    def lookup_cname(self, name: str) -> Deferred:
        """See L{IDNSResolver.lookup_cname}; C{cname[name]} is the target."""
        return self._answer(self.cname, "CNAME", name, lambda v: CNAMEAnswer(
            name=name, target=v, ttl=self.ttl, secure=self.is_secure(name)))


@implementer(IPolicyFetcher)
class FakeFetcher:
    """
    A policy fetcher answering from a dict of domain → policy text, exception
    or L{Deferred}.  C{fetches} counts calls per domain.
    """

    def __init__(self) -> None:
        self.policies: dict[str, Any] = {}
        self.fetches: Counter = Counter()

    def fetch(self, domain: str) -> Deferred:
        """Fetch the policy of C{domain} (an A-label name)."""
        self.fetches[domain] += 1
        value = self.policies.get(domain)
        if isinstance(value, BaseException):
            return fail(value)
        if isinstance(value, Deferred):
            return value
        if value is None:
            from mtasts_twisted.fetch import NoPolicyServedError

            return fail(NoPolicyServedError(f"https://mta-sts.{domain}/.well-known/mta-sts.txt", "404"))
        return succeed(FetchedPolicy(policy=parse_policy(value), text=value))
