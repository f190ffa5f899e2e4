"""
Deliver one message with MTA-STS from a Twisted program.

    python examples/relay_delivery.py alice@example.org bob@example.com message.eml \\
        [--nameserver 127.0.0.1:53] [--data-dir DIR]

The policy cache persists in SQLite under --data-dir (default: a
directory in the current one), so later runs reuse cached policies; all
DNS goes through the nameserver given (or those of /etc/resolv.conf), and
policy hosts and MX hosts are verified against the platform's CA roots.
"""

import argparse
import os

from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from mtasts_twisted.cache import PolicyCache
from mtasts_twisted.delivery import Deliverer, DeliverySettings
from mtasts_twisted.dns import DNSHostnameResolver, DNSResolver
from mtasts_twisted.fetch import PolicyFetcher
from mtasts_twisted.store import default_database_url, open_store


async def main(reactor, sender, recipient, path, nameservers, data_dir):
    # The pieces a relay builds once at startup:
    resolver = DNSResolver(reactor, nameservers or None)
    store = await open_store(default_database_url(data_dir), reactor)
    fetcher = PolicyFetcher(reactor, name_resolver=DNSHostnameResolver(resolver))
    cache = PolicyCache(store, resolver, fetcher, reactor)
    deliverer = Deliverer(reactor, resolver, cache, settings=DeliverySettings(helo_name="relay.example.org"))

    # Per message and recipient domain: one call.
    try:
        with open(path, "rb") as message:
            result = await deliverer.deliver(sender, [recipient], message)
    finally:
        await store.close()

    print(f"{result.domain}: policy {result.policy_mode.value if result.policy_mode else 'none found'}")
    for outcome in result.outcomes:
        tls = f"{outcome.tls_version}{' verified' if outcome.verified else ''}" if outcome.tls_version else "no TLS"
        print(f"  {outcome.recipient}: {outcome.status.name} via {outcome.mx_host} ({tls}) {outcome.code} {outcome.message}")
    for report in result.results:  # what a TLSRPT sink would aggregate
        print("  TLSRPT:", report.to_json()["summary"], [f.result_type.value for f in report.failures])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("sender")
    parser.add_argument("recipient")
    parser.add_argument("message", help="a file holding the message, headers and body")
    parser.add_argument("--nameserver", action="append", default=[])
    parser.add_argument("--data-dir", default=os.path.join(os.getcwd(), "mtasts-data"))
    args = parser.parse_args()
    os.makedirs(args.data_dir, exist_ok=True)
    task.react(
        lambda reactor: ensureDeferred(
            main(reactor, args.sender, args.recipient, args.message, args.nameserver, args.data_dir)
        )
    )
