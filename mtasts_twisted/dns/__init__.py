"""
Deferred DNS lookups: dnspython builds and parses the messages, Twisted
carries them over UDP, and over TCP when a UDP reply is truncated.

L{DNSResolver} implements L{mtasts_twisted.interfaces.IDNSResolver}: TXT,
MX, address, TLSA and CNAME lookups against configured nameservers (or
those of C{/etc/resolv.conf}), with per-try timeouts, a total time budget,
checks of every reply against its question, and a small TTL-honouring
answer cache.  Unlike C{twisted.names.client} it asks with the DO bit (RFC
3225), keeps the AD bit of every reply (each answer and each denial says
whether it is DNSSEC C{secure}, as DANE needs: RFC 7672 §2.1) and talks to
any port.

L{DNSHostnameResolver} is an L{IHostnameResolver} backed by it, and
L{reactor_with_resolver} wraps a reactor so that L{HostnameEndpoint} (and so
treq's C{Agent} and the SMTP client) resolve names through our nameservers,
never through the system's C{getaddrinfo}.

The rooms, bottom to top (each imports only those before it):

  - L{errors <mtasts_twisted.dns.errors>}: L{DNSError} and its kinds;
  - L{answers <mtasts_twisted.dns.answers>}: the answer values;
  - L{config <mtasts_twisted.dns.config>}: nameservers, resolv.conf;
  - L{names <mtasts_twisted.dns.names>}: names and IP literals;
  - L{rdata_read <mtasts_twisted.dns.rdata_read>}: the rdata the reply
    reader handles itself (TLSA, and the DNSSEC records it only checks);
  - L{wire <mtasts_twisted.dns.wire>}: the query/reply codec;
  - L{transport <mtasts_twisted.dns.transport>}: one query to one server
    over UDP, and TCP on truncation;
  - L{cache <mtasts_twisted.dns.cache>}: the TTL answer cache;
  - L{resolver <mtasts_twisted.dns.resolver>}: L{DNSResolver};
  - L{hostname <mtasts_twisted.dns.hostname>}: the C{IHostnameResolver}
    adapter;
  - L{records <mtasts_twisted.dns.records>}: the C{_mta-sts} and
    C{_smtp._tls} TXT discoveries, over any L{IDNSResolver}.

This package is named C{dns} inside C{mtasts_twisted}; the dnspython imports
in its modules are absolute, so they load dnspython's top-level C{dns}
package.
"""

# Public names, and the limits and defaults (not in __all__, as before) that
# tests and the reliability report read, from where they have always been
# imported: this package.
from mtasts_twisted.dns.answers import AddressAnswer, CNAMEAnswer, MXAnswer, MXHost, TLSAAnswer, TLSARecord, TXTAnswer
from mtasts_twisted.dns.cache import DEFAULT_CACHE_SIZE, MAX_CACHE_TTL, MAX_NEGATIVE_TTL
from mtasts_twisted.dns.config import DEFAULT_PORT, Nameserver, format_nameserver, parse_nameserver, system_nameservers
from mtasts_twisted.dns.errors import DNSError, DNSNoRecordError, DNSTemporaryError
from mtasts_twisted.dns.hostname import DNSHostnameResolver, reactor_with_resolver
from mtasts_twisted.dns.records import lookup_sts_answer, lookup_sts_record, lookup_tlsrpt_record
from mtasts_twisted.dns.resolver import (
    DEFAULT_ATTEMPTS,
    DEFAULT_BUDGET,
    DEFAULT_TIMEOUT,
    MAX_CNAME_CHAIN,
    DNSResolver,
)
from mtasts_twisted.dns.transport import MAX_TCP_REPLY, DNSReactor
from mtasts_twisted.dns.wire import EDNS_PAYLOAD

__all__ = [
    "AddressAnswer",
    "CNAMEAnswer",
    "DNSError",
    "DNSHostnameResolver",
    "DNSNoRecordError",
    "DNSReactor",
    "DNSResolver",
    "DNSTemporaryError",
    "MXAnswer",
    "MXHost",
    "TLSAAnswer",
    "TLSARecord",
    "TXTAnswer",
    "format_nameserver",
    "lookup_sts_answer",
    "lookup_sts_record",
    "lookup_tlsrpt_record",
    "parse_nameserver",
    "reactor_with_resolver",
    "system_nameservers",
]
