"""
L{DNSResolver}: Deferred TXT, MX, address, TLSA and CNAME lookups against
recursive nameservers, the L{mtasts_twisted.interfaces.IDNSResolver} of
production.

A lookup turns its name into a question (L{mtasts_twisted.dns.names}),
answers it from the cache (L{mtasts_twisted.dns.cache}) or asks the
nameservers in turn (L{mtasts_twisted.dns.transport}) within a time budget,
follows CNAMEs, and shapes the records into an answer
(L{mtasts_twisted.dns.answers}).  Unlike C{twisted.names.client} it asks
with the DO bit, keeps the AD bit of every reply (an answer, or a denial,
is C{secure} when every reply on the way had it: RFC 7672 §2.1.1) and talks
to any port.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

import attrs
import dns.name
import dns.rcode
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mtasts_twisted.dns.answers import AddressAnswer, CNAMEAnswer, MXAnswer, MXHost, TLSAAnswer, TXTAnswer
from mtasts_twisted.dns.cache import DEFAULT_CACHE_SIZE, MAX_CACHE_TTL, _AnswerCache, _Negative, _negative_ttl, _Records
from mtasts_twisted.dns.config import Nameserver, format_nameserver, parse_nameserver, system_nameservers
from mtasts_twisted.dns.errors import DNSNoRecordError, DNSTemporaryError
from mtasts_twisted.dns.names import _ip_literal, _name_text, _to_dns_name_and_text, _type_text
from mtasts_twisted.dns.transport import DNSReactor, _Exchanger, _TryFailed
from mtasts_twisted.dns.wire import _Reply
from mtasts_twisted.interfaces import IDNSResolver

__all__ = ["DEFAULT_ATTEMPTS", "DEFAULT_BUDGET", "DEFAULT_TIMEOUT", "MAX_CNAME_CHAIN", "DNSResolver"]

# The namespace of the module this room was cut from, so log lines read as before.
log = Logger(namespace="mtasts_twisted.dns")

#: Seconds to wait for one reply from one nameserver.
DEFAULT_TIMEOUT = 2.0
#: Seconds one lookup (all servers, retries and CNAME steps) may take.
DEFAULT_BUDGET = 10.0
#: Rounds over the nameserver list (resolv.conf's default C{attempts:2}).
DEFAULT_ATTEMPTS = 2
#: CNAMEs followed in one lookup before giving up.
MAX_CNAME_CHAIN = 8


@implementer(IDNSResolver)
class DNSResolver:
    """
    Deferred DNS lookups against a list of recursive nameservers.

    Each query goes over UDP from a fresh socket on a random port with a
    random ID; a truncated reply is retried over TCP at the same server.
    SERVFAIL, REFUSED, timeouts, malformed replies and network errors move
    on to the next server; servers are tried in turn for C{attempts}
    rounds, all within C{budget} seconds per lookup.

    @ivar nameservers: the C{(ip, port)} pairs, in the order tried.
    """

    def __init__(
        self,
        reactor: DNSReactor,
        nameservers: Sequence[str | Nameserver] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        budget: float = DEFAULT_BUDGET,
        attempts: int = DEFAULT_ATTEMPTS,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        """
        @param reactor: provides C{IReactorTime} and C{IReactorTCP}, and
            C{IReactorFDSet} or C{IReactorUDP} (see L{DNSReactor}); its
            C{seconds()} is the cache's clock.
        @param nameservers: C{"IP[:PORT]"} strings or C{(ip, port)} pairs;
            L{None} reads C{/etc/resolv.conf}.
        @param timeout: seconds to wait for one reply.
        @param budget: seconds one lookup may take in total.
        @param attempts: rounds over the nameserver list.
        @param cache_size: answers kept; 0 disables the cache.
        @raise ValueError: for an empty nameserver list, a bad nameserver or
            a non-positive timeout, budget or attempts.
        """
        if nameservers is None:
            servers = system_nameservers()
        else:
            servers = tuple(
                parse_nameserver(s) if isinstance(s, str) else (str(ipaddress.ip_address(s[0])), int(s[1]))
                for s in nameservers
            )
        if not servers:
            raise ValueError("at least one nameserver is needed")
        if timeout <= 0 or budget <= 0 or attempts < 1:
            raise ValueError("timeout and budget must be positive and attempts at least 1")
        self._reactor = reactor
        self.nameservers: tuple[Nameserver, ...] = servers
        self._budget = float(budget)
        self._attempts = int(attempts)
        self._cache = _AnswerCache(reactor, cache_size)
        self._exchanger = _Exchanger(reactor, float(timeout))

    @property
    def _fd_reactor(self) -> bool:
        """Whether UDP goes over plain sockets read by the reactor (not C{listenUDP})."""
        return self._exchanger.fd_reactor

    def __repr__(self) -> str:
        servers = ", ".join(format_nameserver(s) for s in self.nameservers)
        return f"<DNSResolver [{servers}]>"

    def clear_cache(self) -> None:
        """Forget every cached answer."""
        self._cache.clear()

    # -- IDNSResolver --

    def lookup_txt(self, name: str) -> Deferred[TXTAnswer]:
        """
        Look up the TXT records of C{name}, following CNAMEs.

        @param name: a domain name (A-labels; U-labels are converted).
        @return: L{Deferred} firing with a L{TXTAnswer}, or failing with
            L{DNSNoRecordError}, L{DNSTemporaryError}, or L{DomainError} for
            a name that is not a valid DNS name.
        """
        return Deferred.fromCoroutine(self._lookup_txt(name))

    def lookup_mx(self, domain: str) -> Deferred[MXAnswer]:
        """
        Look up the mail exchangers of C{domain}.

        @param domain: a domain name (A-labels; U-labels are converted).
        @return: L{Deferred} firing with an L{MXAnswer}: hosts sorted by
            preference; the implicit MX when the domain has no MX but has
            addresses (RFC 5321 §5.1); C{null=True} for a null MX (RFC
            7505). Fails with L{DNSNoRecordError} when the domain does not
            exist or has neither MX nor addresses, L{DNSTemporaryError}
            otherwise.
        """
        return Deferred.fromCoroutine(self._lookup_mx(domain))

    def lookup_addresses(self, host: str) -> Deferred[AddressAnswer]:
        """
        Look up the AAAA and A records of C{host} (in parallel).

        An IP literal is answered without DNS. One type failing
        temporarily while the other has addresses still succeeds.

        @param host: a host name or IP literal.
        @return: L{Deferred} firing with an L{AddressAnswer} (IPv6 first),
            or failing with L{DNSNoRecordError} when neither type has
            records, L{DNSTemporaryError} when either failed temporarily
            and neither had records.
        """
        return Deferred.fromCoroutine(self._lookup_addresses(host))

    def lookup_tlsa(self, name: str) -> Deferred[TLSAAnswer]:
        """
        Look up the TLSA records of C{name} (C{_25._tcp.mx.example.com}),
        following CNAMEs (RFC 7672 §2.2.3).

        A record whose association data does not fit its matching type is
        kept (L{TLSARecord}): it is unusable (RFC 6698 §4.1), not a lookup
        failure.  A reply whose TLSA rdata cannot even hold the usage,
        selector and matching type is malformed, and malformed replies are
        temporary failures (RFC 7672 §2.1.2).

        @param name: the TLSA name (A-labels; U-labels are converted).
        @return: L{Deferred} firing with a L{TLSAAnswer}; C{secure} says
            whether every reply had the AD bit.  Fails with
            L{DNSNoRecordError} (C{secure} tells a DNSSEC-authenticated
            denial from an insecure one) or L{DNSTemporaryError} (SERVFAIL,
            which is how a validating resolver answers a "bogus" or
            "indeterminate" RRset; timeouts; malformed replies): never
            "no TLSA" for a lookup that failed (RFC 7672 §2.1.1).
        """
        return Deferred.fromCoroutine(self._lookup_tlsa(name))

    def lookup_cname(self, name: str) -> Deferred[CNAMEAnswer]:
        """
        Look up the CNAME record of C{name} itself (query type CNAME: the
        alias is not followed).

        RFC 7672 §2.1.3 and §2.2.2: when the address records of an MX host
        reached through an alias are insecure, this tells whether the
        alias itself is secure (then its TLSA records still count).

        @param name: a domain name (A-labels; U-labels are converted).
        @return: L{Deferred} firing with a L{CNAMEAnswer}, or failing with
            L{DNSNoRecordError} when C{name} is not an alias (NODATA) or does
            not exist, L{DNSTemporaryError} otherwise.
        """
        return Deferred.fromCoroutine(self._lookup_cname(name))

    # -- lookups --

    async def _lookup_tlsa(self, name: str) -> TLSAAnswer:
        qname, text = _to_dns_name_and_text(name)
        records = await self._resolve(qname, dns.rdatatype.TLSA, text)
        # The wire reader gives TLSA rdatas as TLSARecords (whatever their
        # data), distinct and in the order received.
        return TLSAAnswer(text, records.rdatas, records.ttl, records.secure)

    async def _lookup_cname(self, name: str) -> CNAMEAnswer:
        qname, text = _to_dns_name_and_text(name)
        records = await self._resolve(qname, dns.rdatatype.CNAME, text)
        return CNAMEAnswer(text, _name_text(records.rdatas[0].target), records.ttl, records.secure)

    async def _lookup_txt(self, name: str) -> TXTAnswer:
        qname, text = _to_dns_name_and_text(name)
        records = await self._resolve(qname, dns.rdatatype.TXT, text)
        # RFC 8461 §3.1: the character-strings of one TXT RR are concatenated
        # without separator before parsing; RRs stay separate.
        strings = tuple(b"".join(rdata.strings).decode("utf-8", errors="replace") for rdata in records.rdatas)
        return TXTAnswer(text, strings, records.ttl, records.secure)

    async def _lookup_mx(self, domain: str) -> MXAnswer:
        qname, text = _to_dns_name_and_text(domain)
        try:
            records = await self._resolve(qname, dns.rdatatype.MX, text)
        except DNSNoRecordError as e:
            if e.nxdomain:
                raise
            # RFC 5321 §5.1: no MX records, but the name has an address:
            # it is its own implicit MX with preference 0.
            try:
                addresses = await self._addresses(qname, text)
            except DNSNoRecordError as e2:
                raise DNSNoRecordError(
                    f"{text} has no MX records and no A/AAAA records for an implicit MX"
                    f" (RFC 5321 §5.1; from {e2.server or e.server})",
                    text,
                    "MX",
                    e2.server or e.server,
                    nxdomain=False,
                    secure=e.secure and e2.secure,
                ) from None
            # Secure only if the denial of MX records was secure too.
            return MXAnswer(
                text, (MXHost(0, text),), addresses.ttl, addresses.secure and e.secure, implicit=True
            )
        hosts = {(rdata.preference, rdata.exchange) for rdata in records.rdatas}
        # RFC 7505 §3: a null MX is a single MX whose exchange is the root.
        if all(exchange == dns.name.root for _, exchange in hosts):
            return MXAnswer(text, (), records.ttl, records.secure, null=True)
        # RFC 7505 §3 forbids a null MX beside other MXes; such a "." host
        # cannot be connected to, so it is dropped and the others are kept.
        ordered = sorted(
            MXHost(int(preference), _name_text(exchange))
            for preference, exchange in hosts
            if exchange != dns.name.root
        )
        return MXAnswer(text, tuple(ordered), records.ttl, records.secure)

    async def _lookup_addresses(self, host: str) -> AddressAnswer:
        literal = _ip_literal(host) if isinstance(host, str) else None
        if literal is not None:
            return AddressAnswer(str(literal), (str(literal),), 0, False)
        return await self._addresses(*_to_dns_name_and_text(host))

    async def _addresses(self, qname: dns.name.Name, text: str) -> AddressAnswer:
        types = (dns.rdatatype.AAAA, dns.rdatatype.A)
        # Both types at once (their queries are in flight together).
        lookups = [Deferred.fromCoroutine(self._resolve(qname, rdtype, text)) for rdtype in types]
        results = await defer.DeferredList(lookups, consumeErrors=True)
        addresses: list[str] = []
        ttls: list[int] = []
        secure = True
        canonical: str | None = None
        errors: list[BaseException] = []
        for ok, value in results:
            if ok:
                for rdata in value.rdatas:
                    if rdata.address not in addresses:
                        addresses.append(rdata.address)
                ttls.append(value.ttl)
                # RFC 7672 §2.2.2: the address RRsets used, and every CNAME
                # leading to them, must be secure.
                secure = secure and value.secure
                if canonical is None:
                    canonical = value.target
            else:
                errors.append(value.value)  # type: ignore[attr-defined]  # a Failure when not ok
        if addresses:
            return AddressAnswer(text, tuple(addresses), min(ttls), secure, canonical or text)
        temporary = [e for e in errors if isinstance(e, DNSTemporaryError)]
        if temporary:
            detail = "; ".join(f"{e.rdtype}: {e.detail}" for e in temporary)
            raise DNSTemporaryError(
                f"address lookup of {text} failed temporarily: {detail}",
                text,
                "AAAA/A",
                temporary[0].server,
                detail,
            )
        if len(errors) == len(types) and all(isinstance(e, DNSNoRecordError) for e in errors):
            nxdomain = any(e.nxdomain for e in errors)  # type: ignore[attr-defined]
            server = errors[0].server  # type: ignore[attr-defined]
            what = "does not exist" if nxdomain else "has no AAAA or A records"
            denied_securely = all(e.secure for e in errors)  # type: ignore[attr-defined]
            raise DNSNoRecordError(
                f"{text} {what} (from {server})", text, "AAAA/A", server, nxdomain=nxdomain, secure=denied_securely
            )
        raise errors[0]

    # -- (name, type) → records, following CNAMEs, through the cache --

    async def _resolve(self, qname: dns.name.Name, rdtype: int, name: str) -> _Records:
        """
        @param name: C{qname} as L{_name_text} gives it (for messages, and
            as the cache key: a short string costs a quarter of a C{Name}).
        """
        key = (name, rdtype)
        type_text = _type_text(rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            value, remaining = cached
            if isinstance(value, _Negative):
                raise self._no_record(name, type_text, value.target, value.server, value.nxdomain, value.secure)
            return attrs.evolve(value, ttl=remaining)

        deadline = self._reactor.seconds() + self._budget
        chain: list[dns.name.Name] = [qname]
        ttl = MAX_CACHE_TTL
        # RFC 7672 §2.1.3: secure only if every reply of the chain is.
        secure = True
        current = qname
        while True:
            reply, server = await self._query(current, rdtype, deadline, name, type_text)
            secure = secure and reply.authenticated_data
            asked = current
            # Walk the answer section from the name asked: the records, or
            # a CNAME to follow (RFC 1034 §3.6.2).
            while True:
                rrs = reply.records(current, rdtype)
                if rrs is not None:
                    records = _Records(
                        rrs.rdatas, min(ttl, rrs.ttl), secure, server, name if current is qname else _name_text(current)
                    )
                    self._cache.put(key, records, records.ttl)
                    return records
                cname = reply.records(current, dns.rdatatype.CNAME)
                if cname is None:
                    break
                ttl = min(ttl, cname.ttl)
                target = cname.rdatas[0].target
                # A CNAME loop or an over-long chain is a broken zone that
                # its owner can fix: temporary, as recursive resolvers
                # (which answer SERVFAIL) treat it, never "no record".
                if target in chain:
                    path = " -> ".join(_name_text(n) for n in chain + [target])
                    raise self._temporary(name, type_text, server, f"CNAME loop: {path} (from {server})")
                chain.append(target)
                if len(chain) - 1 > MAX_CNAME_CHAIN:
                    raise self._temporary(
                        name, type_text, server, f"CNAME chain longer than {MAX_CNAME_CHAIN} from {server}"
                    )
                current = target
            if reply.rcode == dns.rcode.NXDOMAIN:
                # RFC 6604 §2: after a CNAME chain, NXDOMAIN is about its
                # last name.
                negative = _Negative(True, _name_text(current), server, secure)
            elif current == asked:
                negative = _Negative(False, _name_text(current), server, secure)
            else:
                # The server gave a CNAME but not the records of its target
                # (an authoritative server, or a chain leaving its zones):
                # ask for the target.
                continue
            self._cache.put(key, negative, min(ttl, _negative_ttl(reply)))
            raise self._no_record(name, type_text, negative.target, server, negative.nxdomain, negative.secure)

    def _no_record(
        self, name: str, rdtype: str, target: str, server: str, nxdomain: bool, secure: bool
    ) -> DNSNoRecordError:
        via = "" if target == name else f" (via CNAME to {target})"
        how = "secure " if secure else ""
        if nxdomain:
            message = f"{name}{via} does not exist ({how}NXDOMAIN for {rdtype} from {server})"
        else:
            message = f"{name}{via} has no {rdtype} records ({how}NODATA from {server})"
        return DNSNoRecordError(message, name, rdtype, server, nxdomain=nxdomain, secure=secure)

    def _temporary(self, name: str, rdtype: str, server: str | None, detail: str) -> DNSTemporaryError:
        log.info("DNS {rdtype} lookup of {name} failed: {detail}", rdtype=rdtype, name=name, detail=detail)
        return DNSTemporaryError(
            f"{rdtype} lookup of {name} failed temporarily: {detail}", name, rdtype, server, detail
        )

    async def _query(
        self, qname: dns.name.Name, rdtype: int, deadline: float, name: str, type_text: str
    ) -> tuple[_Reply, str]:
        """
        Ask the nameservers in turn until one gives a definite answer
        (NOERROR or NXDOMAIN).

        @return: the reply and the server (text) that gave it.
        @raise DNSTemporaryError: when none did within the budget.
        """
        failures: list[str] = []
        for _ in range(self._attempts):
            for server in self.nameservers:
                remaining = deadline - self._reactor.seconds()
                if remaining <= 0:
                    failures.append(f"time budget of {self._budget:g}s exhausted")
                    raise self._temporary(name, type_text, None, "; ".join(failures))
                try:
                    return await self._exchanger.exchange(qname, rdtype, server, deadline), format_nameserver(server)
                except _TryFailed as e:
                    log.debug(
                        "DNS {rdtype} query for {qname} failed: {detail}",
                        rdtype=type_text,
                        qname=_name_text(qname),
                        detail=e.detail,
                    )
                    failures.append(e.detail)
        last = format_nameserver(self.nameservers[-1])
        raise self._temporary(name, type_text, last, "; ".join(dict.fromkeys(failures)))
