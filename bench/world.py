"""
The benchmark world: a DNS server on 127.0.0.1:53 and an HTTPS policy server
on 127.0.0.1:443 serving generated MTA-STS domains, plus a line-based JSON
control port so the harness can read query and fetch counts.

Run inside the benchmark's network namespace (bench/run.py starts it)::

    python bench/world.py --workdir W --cached 1000 --cold 3000 --control 9999

Domains (all under bench.test, every policy in enforce mode):

  - dN.bench.test   N < --cached: the hot set for cached lookups
  - cN.bench.test   N < --cold: unique domains for cold lookups
  - coalN.bench.test  N < 20: one-uncached-domain coalescing tests
  - failN.bench.test  N < 20: TXT record published, policy host answers 404
  - rN.rss.bench.test any N: synthesised on the fly (TXT, MX, A), no policy
    served: the RSS test pre-seeds these into the cache, so an HTTPS request
    for one of them means the cache was not read
  - relay.bench.test: the relay phase's enforce domain, MX
    mx.relay.bench.test -> 127.0.0.1 (bench/relay.py's sink on :25)

Writes W/ca.pem (the private CA), W/mx-relay.pem and W/mx-relay.key (a
certificate chain and key for mx.relay.bench.test from that CA, for the relay
sink) and prints READY when listening.

The test servers of mtasts_twisted.testing listen on ephemeral ports; here a
reactor proxy maps their first UDP listen and the HTTPS listen to 53/443,
and the DNS server's negative-answer check is made O(1) (it scans the whole
zone, which is slow with tens of thousands of names).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from mtasts_twisted.testing.dns import DNSTestServer
from mtasts_twisted.testing.https import PolicyServer, Route
from mtasts_twisted.testing.pki import PKI, IssuedCertificate

ZONE = "bench.test"
RSS_ZONE = "rss." + ZONE
RELAY_DOMAIN = "relay." + ZONE
LOOPBACK = "127.0.0.1"
TTL = 300
SPECIAL = 20
SAN_BLOCK = 1  # policy hosts per certificate (1: realistic; many SANs slow the name check)


def policy_text(domain: str) -> str:
    return f"version: STSv1\nmode: enforce\nmx: mx.{domain}\nmax_age: 86400\n"


class _PortProxy:
    """A reactor whose ephemeral listens go to fixed ports (first UDP, all TCP)."""

    def __init__(self, real, udp_port: int | None = None, tcp_port: int | None = None) -> None:
        self._real = real
        self._udp = udp_port
        self._tcp = tcp_port

    def __getattr__(self, name):
        return getattr(self._real, name)

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if port == 0 and self._udp is not None:
            port, self._udp = self._udp, None
        return self._real.listenUDP(port, protocol, interface=interface, maxPacketSize=maxPacketSize)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port == 0 and self._tcp is not None:
            port = self._tcp
        return self._real.listenTCP(port, factory, backlog=1024, interface=interface)


_IN = dns.rdataclass.IN
_TXT = dns.rdatatype.TXT
_MX = dns.rdatatype.MX
_A = dns.rdatatype.A
_RSS = dns.name.from_text(RSS_ZONE + ".")


class BenchDNS(DNSTestServer):
    """DNSTestServer with O(1) existence checks and synthesised rss names."""

    def __init__(self) -> None:
        super().__init__(negative_ttl=TTL)
        self._existing: set | None = None

    def _add(self, name, rdata, ttl):
        self._existing = None
        super()._add(name, rdata, ttl)

    def remove(self, name, rdtype=None):
        self._existing = None
        super().remove(name, rdtype)

    def _exists(self, name):
        if self._existing is None:
            existing = set()
            for owner in self._zone:
                while owner not in existing:
                    existing.add(owner)
                    if owner == dns.name.root:
                        break
                    owner = owner.parent()
            self._existing = existing
        return name in self._existing

    def _lookup(self, qname, rdtype):
        name = qname.canonicalize()
        if name.is_subdomain(_RSS) and name != _RSS:
            labels = name.relativize(_RSS).labels
            text = name.to_text()
            if len(labels) == 1:  # rN.rss.bench.test
                if rdtype == _MX:
                    return dns.rcode.NOERROR, [dns.rrset.from_text(text, TTL, _IN, _MX, f"10 mx.{text}")], False
            elif labels[0] == b"_mta-sts" and len(labels) == 2:
                if rdtype == _TXT:
                    return dns.rcode.NOERROR, [dns.rrset.from_text(text, TTL, _IN, _TXT, '"v=STSv1; id=1"')], False
            elif labels[0] in (b"mta-sts", b"mx") and len(labels) == 2:
                if rdtype == _A:
                    return dns.rcode.NOERROR, [dns.rrset.from_text(text, TTL, _IN, _A, LOOPBACK)], False
            else:
                return dns.rcode.NXDOMAIN, [], True
            return dns.rcode.NOERROR, [], True
        return super()._lookup(qname, rdtype)


class BenchPolicyServer(PolicyServer):
    """PolicyServer on port 443 whose certificates each cover a block of hosts."""

    def add_hosts(self, hosts: list[str], routes: dict[str, Route]) -> None:
        for i in range(0, len(hosts), SAN_BLOCK):
            block = hosts[i:i + SAN_BLOCK]
            cert: IssuedCertificate = self._pki._issue(self._pki._trusted, block)
            context = self._make_context(cert)
            for host in block:
                self._contexts[host] = context
        for host in hosts:
            self.serve(host, routes[host])


class World:
    def __init__(self, args) -> None:
        self.pki = PKI()
        os.makedirs(args.workdir, exist_ok=True)
        self.ca_file = self.pki.write_ca_file(os.path.join(args.workdir, "ca.pem"))
        self.dns = BenchDNS()
        self.https = BenchPolicyServer(_PortProxy(reactor, tcp_port=443), self.pki)
        domains = [f"d{i}.{ZONE}" for i in range(args.cached)]
        domains += [f"c{i}.{ZONE}" for i in range(args.cold)]
        domains += [f"coal{i}.{ZONE}" for i in range(SPECIAL)]
        domains.append(RELAY_DOMAIN)
        mx = self.pki.valid(f"mx.{RELAY_DOMAIN}")
        with open(os.path.join(args.workdir, "mx-relay.pem"), "wb") as f:
            f.write(mx.chain_pem)
        with open(os.path.join(args.workdir, "mx-relay.key"), "wb") as f:
            f.write(mx.key_pem)
        failing = [f"fail{i}.{ZONE}" for i in range(SPECIAL)]
        routes = {}
        for domain in domains + failing:
            self.dns.add_txt(f"_mta-sts.{domain}", "v=STSv1; id=1", ttl=TTL)
            self.dns.add_a(f"mta-sts.{domain}", LOOPBACK, ttl=TTL)
            self.dns.add_mx(domain, 10, f"mx.{domain}", ttl=TTL)
            self.dns.add_a(f"mx.{domain}", LOOPBACK, ttl=TTL)
            host = f"mta-sts.{domain}"
            routes[host] = Route.status_only(404) if domain in failing else Route.policy(policy_text(domain))
        self.https.add_hosts(list(routes), routes)
        self.dns.start(_PortProxy(reactor, udp_port=53, tcp_port=53))
        self.https.start()
        reactor.listenTCP(args.control, Factory.forProtocol(lambda: Control(self)), interface=LOOPBACK)

    def counts(self, txt: list[str], https: list[str]) -> dict:
        requests: dict[str, int] = {}
        for served in self.https.requests:
            requests[served.host] = requests.get(served.host, 0) + 1
        return {
            "txt": {name: self.dns.count(f"_mta-sts.{name}", "TXT") for name in txt},
            "https": {name: requests.get(f"mta-sts.{name}", 0) for name in https},
            "dns_total": sum(self.dns.queries.values()),
            "https_total": len(self.https.requests),
        }


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, world: World) -> None:
        self.world = world

    def lineReceived(self, line: bytes) -> None:
        request = json.loads(line)
        op = request.get("op")
        if op == "counts":
            reply = self.world.counts(request.get("txt", []), request.get("https", []))
        elif op == "ping":
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown op {op!r}"}
        self.sendLine(json.dumps(reply).encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cached", type=int, default=1000)
    parser.add_argument("--cold", type=int, default=3000)
    parser.add_argument("--control", type=int, default=9999)
    args = parser.parse_args()
    World(args)
    print("READY", flush=True)
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
