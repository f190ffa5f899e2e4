"""
A DNSSEC test world: signed zones behind a real validating resolver.

L{DNSSECWorld} signs zones with dnspython (ECDSA P-256, NSEC), serves them
with Knot DNS (C{knotd}, Debian C{knot}) and puts Unbound (Debian
C{unbound}) in front as the validating resolver, with the test parent
zone's key as its only trust anchor.  Both listen on 127.0.0.1 only.  A
client asks Unbound (L{DNSSECWorld.nameserver}) and sees what a mail server
behind a local validating resolver sees (RFC 7672 §2.1): the AD bit on
secure answers, none on insecure ones, and SERVFAIL for bogus ones::

    from mtasts_twisted.testing.dnssec import DNSSECWorld, Security, Zone

    world = DNSSECWorld([
        Zone("secure.test.", ("mx 300 IN A 127.0.0.1",
                              "_25._tcp.mx 300 IN TLSA 3 1 1 " + digest)),
        Zone("plain.test.", ("mx 300 IN A 127.0.0.1",), security=Security.INSECURE),
        Zone("broken.test.", ("mx 300 IN A 127.0.0.1",), security=Security.BOGUS),
    ])
    world.start()                       # a second; require_world() skips or fails
    resolver = DNSResolver(reactor, [world.nameserver])
    ...
    world.stop()

Every child zone is delegated from the signed parent C{test.}: a
L{Security.SECURE} zone has a DS for its key there, an L{Security.INSECURE}
zone is unsigned with a signed proof that it has no DS, and a
L{Security.BOGUS} zone is signed but its DS names a different key.
L{Zone.bogus_rrsets} breaks the signature of chosen RRsets only (a forged
answer in a secure zone).

The helper is synchronous (subprocess) because it is test setup; every step
has a timeout, and the servers die with the process that started them.
"""

from __future__ import annotations

import atexit
import ctypes
import enum
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest
from collections.abc import Iterable, Mapping, Sequence

import attrs
import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "PARENT",
    "DNSSECWorld",
    "Security",
    "Zone",
    "dnssec_world_available",
    "require_world",
]

#: The signed parent of every test zone; its key is the resolver's only
#: trust anchor.  C{test.} is reserved for testing (RFC 6761 §6.2).
PARENT = "test."

_TIMEOUT = 30.0
_TTL = 300
_PROGRAMS = ("knotd", "unbound")


class Security(enum.Enum):
    """What the validating resolver makes of a zone (RFC 4035 §4.3)."""

    #: Signed, with a DS in the parent: answers carry the AD bit.
    SECURE = "secure"
    #: Unsigned, and the parent proves there is no DS: no AD bit.
    INSECURE = "insecure"
    #: Signed, but the parent's DS names another key: SERVFAIL.
    BOGUS = "bogus"


@attrs.frozen
class Zone:
    """
    One child zone of L{PARENT}.

    @ivar name: the zone's name, a child of L{PARENT} (C{"x.test."}).
    @ivar records: zone-file lines relative to the zone (C{"mx 300 IN A
        127.0.0.1"}); the SOA and NS records are added.
    @ivar security: how the zone is delegated and signed.
    @ivar bogus_rrsets: C{(owner, type)} pairs (owner relative, C{"@"} for
        the apex) whose signatures are broken after signing, so that only
        those answers are bogus.
    @ivar raw_records: C{(owner, type, rdata)} triples (owner relative)
        added as raw rdata before signing, however malformed: records that
        dnspython's zone parser would refuse, such as a TLSA record whose
        digest has the wrong length.
    """

    name: str
    records: tuple[str, ...] = ()
    security: Security = Security.SECURE
    bogus_rrsets: tuple[tuple[str, str], ...] = ()
    raw_records: tuple[tuple[str, str, bytes], ...] = ()


def dnssec_world_available() -> tuple[bool, str]:
    """
    Tell whether L{DNSSECWorld} can run here.

    @return: C{(True, "")}, or C{(False, reason)} naming what is missing.
    """
    missing = [name for name in _PROGRAMS if _find(name) is None]
    if missing:
        return False, (
            f"{' and '.join(missing)} not found (apt-get install knot unbound):"
            " the DNSSEC test world needs them")
    return True, ""


def require_world(zones: Sequence[Zone], environ: Mapping[str, str] | None = None) -> DNSSECWorld:
    """
    Start a L{DNSSECWorld} for a test that needs one.

    @param zones: the zones to serve.
    @param environ: the environment; L{os.environ} when L{None}.
    @raise unittest.SkipTest: knotd or unbound is not installed here.
    @raise RuntimeError: they are not installed but C{CI=true} (CI must run
        these tests), or the world would not start.
    """
    env = os.environ if environ is None else environ
    available, reason = dnssec_world_available()
    if not available:
        if env.get("CI", "").lower() == "true":
            raise RuntimeError(f"CI=true but DNSSEC tests cannot run: {reason}")
        raise unittest.SkipTest(reason)
    world = DNSSECWorld(zones)
    world.start()
    return world


def _find(program: str) -> str | None:
    return shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.access(p, os.X_OK)), None)


def _free_ports(count: int) -> list[int]:
    """Ports free for both UDP and TCP on 127.0.0.1."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if port not in ports:
            ports.append(port)
    return ports


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the test process dies (Linux)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@attrs.frozen
class _Key:
    private: ec.EllipticCurvePrivateKey
    dnskey: dns.rdata.Rdata

    @classmethod
    def generate(cls) -> _Key:
        private = ec.generate_private_key(ec.SECP256R1())
        dnskey = dns.dnssec.make_dnskey(
            private.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257)
        return cls(private, dnskey)

    def ds(self, name: str) -> dns.rdata.Rdata:
        return dns.dnssec.make_ds(name, self.dnskey, "SHA256")


def _zone_text(name: str, records: Iterable[str]) -> str:
    head = [
        f"@ {_TTL} IN SOA ns.{PARENT} hostmaster.{PARENT} 1 300 300 3600 {_TTL}",
        f"@ {_TTL} IN NS ns.{PARENT}",
    ]
    return "\n".join([*head, *records]) + "\n"


def _parsed(text: str, origin: str, raw: Iterable[tuple[str, str, bytes]] = ()) -> dns.zone.Zone:
    zone = dns.zone.from_text(text, origin=origin, relativize=False)
    assert zone.origin is not None
    for owner, rdtype, rdata in raw:
        name = dns.name.from_text(owner, zone.origin) if owner != "@" else zone.origin
        covered = dns.rdatatype.from_text(rdtype)
        rdataset = zone.find_node(name, create=True).find_rdataset(dns.rdataclass.IN, covered, create=True)
        rdataset.add(dns.rdata.GenericRdata(dns.rdataclass.IN, covered, rdata), _TTL)
    return zone


def _signed(
    text: str, origin: str, key: _Key, bogus: Iterable[tuple[str, str]] = (),
    raw: Iterable[tuple[str, str, bytes]] = (),
) -> dns.zone.Zone:
    zone = _parsed(text, origin, raw)
    now = time.time()
    # Valid from an hour ago for a week: clock skew between the signer and
    # the resolver does not matter.
    dns.dnssec.sign_zone(zone, keys=[(key.private, key.dnskey)],  # type: ignore[list-item]
                         inception=now - 3600, expiration=now + 7 * 86400)
    for owner, rdtype in bogus:
        _break_signature(zone, owner, rdtype)
    return zone


def _break_signature(zone: dns.zone.Zone, owner: str, rdtype: str) -> None:
    """Flip one bit of every signature over C{owner}/C{rdtype}."""
    assert zone.origin is not None
    name = dns.name.from_text(owner, zone.origin) if owner != "@" else zone.origin
    covered = dns.rdatatype.from_text(rdtype)
    node = zone.find_node(name)
    rrsigs = node.find_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, covered)
    broken = []
    for rrsig in rrsigs:
        signature = bytearray(rrsig.signature)
        signature[-1] ^= 0x01
        broken.append(rrsig.replace(signature=bytes(signature)))
    rrsigs.clear()
    for rrsig in broken:
        rrsigs.add(rrsig)


class DNSSECWorld:
    """
    Signed zones on Knot DNS behind a validating Unbound, on 127.0.0.1.

    @ivar nameserver: after L{start}, C{"127.0.0.1:PORT"} of the validating
        resolver, as C{--nameserver} takes it.
    @ivar authoritative: after L{start}, C{"127.0.0.1:PORT"} of the
        authoritative server (for tests that bypass validation).
    """

    def __init__(self, zones: Sequence[Zone], timeout: float = _TIMEOUT) -> None:
        """
        @param zones: the child zones of L{PARENT} to serve.
        @param timeout: the most seconds a start or stop may take.
        @raise ValueError: a zone is not a child of L{PARENT}, or two share
            a name.
        """
        names = [dns.name.from_text(z.name) for z in zones]
        parent = dns.name.from_text(PARENT)
        for zone, name in zip(zones, names):
            if not name.is_subdomain(parent) or len(name) != len(parent) + 1:
                raise ValueError(f"{zone.name!r} is not a child of {PARENT}")
        if len(set(names)) != len(names):
            raise ValueError("two zones share a name")
        self.zones = tuple(zones)
        self._timeout = timeout
        self._dir: str | None = None
        self._processes: list[subprocess.Popen[bytes]] = []
        self.nameserver: str | None = None
        self.authoritative: str | None = None

    def _write_zones(self, directory: str) -> str:
        """Sign and write every zone; return the parent's DS (the anchor)."""
        parent_key = _Key.generate()
        delegations = [f"ns {_TTL} IN A 127.0.0.1"]
        for zone in self.zones:
            label = zone.name[: -len(PARENT) - 1]
            delegations.append(f"{label} {_TTL} IN NS ns.{PARENT}")
            text = _zone_text(zone.name, zone.records)
            if zone.security is Security.INSECURE:
                content = _parsed(text, zone.name, zone.raw_records)
            else:
                key = _Key.generate()
                # A bogus zone's parent vouches for a key the zone never uses.
                vouched = key if zone.security is Security.SECURE else _Key.generate()
                delegations.append(f"{label} {_TTL} IN DS {vouched.ds(zone.name).to_text()}")
                content = _signed(text, zone.name, key, zone.bogus_rrsets, zone.raw_records)
            content.to_file(os.path.join(directory, f"{zone.name}zone"), relativize=False)
        parent = _signed(_zone_text(PARENT, delegations), PARENT, parent_key)
        parent.to_file(os.path.join(directory, f"{PARENT}zone"), relativize=False)
        return f"{PARENT} {_TTL} IN DS {parent_key.ds(PARENT).to_text()}\n"

    def _spawn(self, argv: list[str], log: str) -> None:
        assert self._dir is not None
        with open(os.path.join(self._dir, log), "ab") as out:
            self._processes.append(subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self._dir, preexec_fn=_die_with_parent))

    def _logs(self) -> str:
        texts = []
        for name in ("knot.log", "unbound.log"):
            path = os.path.join(self._dir or "", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    texts.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(texts)

    def start(self) -> str:
        """
        Sign the zones and start both servers (about a second).

        @return: L{nameserver}.
        @raise RuntimeError: a server did not answer in time; the message
            holds both logs.
        """
        if self.nameserver is not None:
            return self.nameserver
        available, reason = dnssec_world_available()
        if not available:
            raise RuntimeError(reason)
        self._dir = directory = tempfile.mkdtemp(prefix="mtasts-dnssec-")
        auth_port, resolver_port = _free_ports(2)
        anchor = self._write_zones(directory)
        with open(os.path.join(directory, "anchor"), "w") as f:
            f.write(anchor)
        all_zones = [PARENT, *(z.name for z in self.zones)]
        with open(os.path.join(directory, "knot.conf"), "w") as f:
            f.write(
                f"server:\n    rundir: {directory}\n    listen: 127.0.0.1@{auth_port}\n"
                f"database:\n    storage: {directory}/db\n"
                "log:\n  - target: stderr\n    any: info\n"
                "zone:\n" + "".join(
                    f"  - domain: {name}\n    file: {directory}/{name}zone\n"
                    f"    zonefile-sync: -1\n    journal-content: none\n"
                    for name in all_zones))
        # Each zone is a stub zone: Unbound asks Knot on its port for it
        # (delegations alone would send it to port 53), and still validates
        # the chain from the anchor through the parent's DS records.
        with open(os.path.join(directory, "unbound.conf"), "w") as f:
            f.write(
                "server:\n"
                f"  interface: 127.0.0.1\n  port: {resolver_port}\n"
                "  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n"
                f"  directory: \"{directory}\"\n  pidfile: \"\"\n  use-syslog: no\n"
                "  logfile: \"\"\n  verbosity: 1\n  val-log-level: 2\n"
                "  do-ip6: no\n  do-not-query-localhost: no\n"
                "  access-control: 127.0.0.0/8 allow\n"
                "  module-config: \"validator iterator\"\n"
                f"  trust-anchor-file: \"{directory}/anchor\"\n"
                # RFC 6761 §6.2: Unbound answers test. itself unless told not to.
                f"  local-zone: \"{PARENT}\" nodefault\n"
                "  cache-max-ttl: 5\n  cache-max-negative-ttl: 5\n"
                + "".join(f"stub-zone:\n  name: \"{name}\"\n  stub-addr: 127.0.0.1@{auth_port}\n"
                          for name in all_zones))
        try:
            self._spawn([_find("knotd") or "knotd", "-c", "knot.conf"], "knot.log")
            self._wait(auth_port, validating=False)
            self._spawn([_find("unbound") or "unbound", "-d", "-c", "unbound.conf"], "unbound.log")
            self._wait(resolver_port, validating=True)
        except BaseException:
            logs = self._logs()
            self.stop()
            raise RuntimeError(f"the DNSSEC test world did not start:\n{logs}") from None
        atexit.register(self.stop)
        self.authoritative = f"127.0.0.1:{auth_port}"
        self.nameserver = f"127.0.0.1:{resolver_port}"
        return self.nameserver

    def _wait(self, port: int, validating: bool) -> None:
        """Ask for the parent's SOA until it comes (with AD when validating)."""
        deadline = time.monotonic() + self._timeout
        query = dns.message.make_query(PARENT, "SOA", want_dnssec=True)
        while True:
            if any(p.poll() is not None for p in self._processes):
                raise RuntimeError("a server exited")
            try:
                reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
                if not validating or reply.flags & dns.flags.AD:
                    return
            except (dns.exception.Timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer on port {port} in {self._timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop both servers and remove their directory."""
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
        for process in self._processes:
            try:
                process.wait(self._timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.nameserver = self.authoritative = None
