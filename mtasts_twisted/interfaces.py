"""
Interfaces at the seams of mtasts_twisted.

Each interface here has more than one implementation or is faked in tests.
Every implementation is checked with ``zope.interface.verify.verifyObject``.
"""

from zope.interface import Attribute, Interface


class IDNSResolver(Interface):
    """
    Deferred-based DNS lookups of the records MTA-STS and DANE need.

    Every method returns a L{Deferred}.  A definite negative answer (the name
    does not exist, or has no data of the asked type) fails with
    L{mtasts_twisted.dns.DNSNoRecordError}; anything that may succeed later
    (timeout, SERVFAIL, REFUSED, malformed reply) fails with
    L{mtasts_twisted.dns.DNSTemporaryError}.  Every answer, and every
    L{DNSNoRecordError<mtasts_twisted.dns.DNSNoRecordError>}, carries
    C{secure}: whether the (trusted, validating) resolver set the AD bit on
    every reply it was made of (RFC 4035 §3.2.3, RFC 7672 §2.1.1).
    """

    def lookup_txt(name):
        """
        Look up the TXT records of C{name} (an A-label name), following CNAMEs.

        @return: L{Deferred} firing with a L{mtasts_twisted.dns.TXTAnswer}
            whose C{strings} hold one text per RR, the RR's strings joined
            without separator (RFC 8461 §3.1).
        """

    def lookup_mx(domain):
        """
        Look up the MX hosts of C{domain} (an A-label name).

        @return: L{Deferred} firing with a L{mtasts_twisted.dns.MXAnswer}:
            hosts sorted by preference; the implicit MX (RFC 5321 §5.1) when
            the domain has addresses but no MX; C{null=True} for a null MX.
        """

    def lookup_addresses(host):
        """
        Look up the IPv6 and IPv4 addresses of C{host}, following CNAMEs.

        @return: L{Deferred} firing with a L{mtasts_twisted.dns.AddressAnswer}
            (C{canonical}: the name after the CNAMEs).
        """

    def lookup_tlsa(name):
        """
        Look up the TLSA records of C{name} (C{_25._tcp.mx.example.com}, an
        A-label name), following CNAMEs (RFC 7672 §2.2.3).

        @return: L{Deferred} firing with a L{mtasts_twisted.dns.TLSAAnswer}.
            A DNSSEC "bogus" or "indeterminate" answer (SERVFAIL from a
            validating resolver) fails with
            L{mtasts_twisted.dns.DNSTemporaryError}, never as "no records"
            (RFC 7672 §2.1.1).
        """

    def lookup_cname(name):
        """
        Look up the CNAME record of C{name} itself (not followed): whether
        an alias is secure when what it leads to is not (RFC 7672 §2.1.3).

        @return: L{Deferred} firing with a L{mtasts_twisted.dns.CNAMEAnswer};
            fails with L{mtasts_twisted.dns.DNSNoRecordError} when C{name}
            is not an alias.
        """


class IShelf(Interface):
    """
    One table of a persistent store: an async mapping of string keys to
    JSON-serialisable dicts.  Every method returns a L{Deferred}.
    """

    name = Attribute("The table's name.")

    def get(key):
        """Fire with the value stored under C{key}, or L{None}."""

    def put(key, value):
        """Store C{value} (a JSON-serialisable dict) under C{key}; fire with L{None}."""

    def delete(key):
        """Remove C{key}; fire with C{True} if it was there, else C{False}."""

    def items(after=None, limit=None):
        """
        Fire with a list of the C{(key, value)} pairs in key (code point)
        order: every pair, or with C{after} only keys after it, and with
        C{limit} at most that many (to read a large table page by page).
        """

    def update(key, function):
        """
        Atomically replace the value under C{key} by C{function(old)}.

        C{function} receives the stored dict or L{None} and returns the new
        dict, or L{None} to delete the key.  It runs in a database
        transaction, so it must not block on anything but the database.
        Fire with the new value.
        """


class IStore(Interface):
    """A persistent store: a database holding named L{IShelf} tables."""

    url = Attribute("The database URL the store was opened with (no password).")

    def shelf(name):
        """Return the L{IShelf} for table C{name}; tables are made on open."""

    def close():
        """Close every connection; fire a L{Deferred} when done."""


class IResultSink(Interface):
    """
    Where TLSRPT results go: every policy lookup and delivery attempt hands
    its L{mtasts_twisted.results.Result} here.
    """

    def record(result, when=None):
        """
        Record C{result} (a L{mtasts_twisted.results.Result}) as having
        happened at C{when} (POSIX seconds; the sink's clock when L{None}).
        Must not block and must not fail the caller.
        """


class IPolicyFetcher(Interface):
    """
    Fetches an MTA-STS policy over HTTPS (RFC 8461 §3.3): the policy cache's
    source of policies.  Implemented by L{mtasts_twisted.fetch.PolicyFetcher},
    its metered wrapper, and L{mtasts_twisted.testing.memory.FakeFetcher}.
    """

    def fetch(domain):
        """
        Fetch the policy of C{domain} (an A-label name).

        @return: L{Deferred} firing with a
            L{mtasts_twisted.fetch.FetchedPolicy}, or failing with a
            L{mtasts_twisted.fetch.PolicyFetchError} that carries its RFC
            8460 result type and reason.
        """


class IDeliverer(Interface):
    """
    Delivers one message to recipients of one domain: what the relay's
    workers and the TLSRPT report mailer need of
    L{mtasts_twisted.delivery.Deliverer} (and of its metered wrapper).
    """

    def deliver(sender, recipients, message, smtputf8=False, requiretls=False):
        """
        Deliver C{message} (a binary file, read from its current position)
        from C{sender} to C{recipients}, all of one domain; C{smtputf8}:
        it was submitted with the SMTPUTF8 parameter (RFC 6531);
        C{requiretls}: with the REQUIRETLS parameter (RFC 8689).

        @return: L{Deferred} firing with a
            L{mtasts_twisted.delivery.DeliveryResult}: one outcome per
            recipient; it fails only on a bug.
        """
