"""
Deliver one message with MTA-STS from a Twisted program.

    python examples/relay_delivery.py alice@example.org bob@example.com message.eml \\
        [--nameserver IP[:PORT]]... [--ca-file PEM] [--helo NAME] [--data-dir DIR]

The policy cache persists in SQLite under --data-dir (default: a
directory in the current one), so later runs reuse cached policies.  All
DNS goes through the nameservers given (or those of /etc/resolv.conf);
policy hosts and MX hosts are verified against --ca-file (or the
platform's CA roots); --helo is the name sent in EHLO (this host's FQDN by
default).  --delivery-port and --policy-port are for tests and lab setups
(MX hosts listen on 25 and policy hosts on 443 everywhere else).
"""

import argparse
import os
import socket

from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliverySettings
from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
from mtasts_twisted.fetch import PolicyFetcher
from mtasts_twisted.store import default_database_url, open_store


async def main(reactor, args):
    # The pieces a relay builds once at startup:
    resolver = DNSResolver(reactor, args.nameserver or None)
    store = await open_store(default_database_url(args.data_dir), reactor)
    fetcher = PolicyFetcher(reactor, trust_roots=args.ca_file, resolver=resolver,
                            name_resolver=DNSHostnameResolver(resolver), port=args.policy_port)
    cache = PolicyCache(store, resolver, fetcher, reactor)
    settings = DeliverySettings(helo_name=args.helo, port=args.port, port_for=args.port_for)
    deliverer = Deliverer(reactor, resolver, cache, trust_root=args.ca_file, settings=settings)

    # Per message and recipient domain: one call.
    try:
        with open(args.message, "rb") as message:
            result = await deliverer.deliver(args.sender, [args.recipient], message)
    finally:
        # At shutdown: QUIT parked sessions, write the cache, close the store.
        await deliverer.close()
        await cache.stop()
        await store.close()

    print(f"{result.domain}: policy {result.policy_mode.value if result.policy_mode else 'none found'}")
    for outcome in result.outcomes:
        tls = f"{outcome.tls_version}{' verified' if outcome.verified else ''}" if outcome.tls_version else "no TLS"
        print(f"  {outcome.recipient}: {outcome.status.name} via {outcome.mx_host} ({tls}) {outcome.code} {outcome.message}")
    for report in result.results:  # what a TLSRPT sink would aggregate
        print("  TLSRPT:", report.to_json()["summary"], [f.result_type.value for f in report.failures])


def delivery_port(value):
    """C{PORT}, or C{HOST=PORT} for one MX host."""
    host, _, port = value.rpartition("=")
    return host.lower().rstrip("."), int(port)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("sender")
    parser.add_argument("recipient")
    parser.add_argument("message", help="a file holding the message, headers and body")
    parser.add_argument("--nameserver", action="append", default=[], metavar="IP[:PORT]",
                        help="DNS server for every lookup (repeatable; default: /etc/resolv.conf)")
    parser.add_argument("--ca-file", metavar="PEM", help="trust these CAs for policy and MX hosts, not the system's")
    parser.add_argument("--helo", default=socket.getfqdn(), metavar="NAME", help="EHLO name (default: %(default)s)")
    parser.add_argument("--data-dir", default=os.path.join(os.getcwd(), "mtasts-data"), metavar="DIR",
                        help="the policy cache's directory (default: %(default)s)")
    parser.add_argument("--delivery-port", action="append", type=delivery_port, default=[],
                        metavar="[HOST=]PORT", help="TCP port of MX hosts, or of one (repeatable; default 25)")
    parser.add_argument("--policy-port", type=int, default=443, metavar="PORT",
                        help="TCP port of policy hosts (default 443)")
    args = parser.parse_args()
    args.port = next((port for host, port in reversed(args.delivery_port) if not host), 25)
    args.port_for = {host: port for host, port in args.delivery_port if host}
    os.makedirs(args.data_dir, exist_ok=True)
    task.react(lambda reactor: ensureDeferred(main(reactor, args)))
