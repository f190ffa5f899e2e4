"""
The TXT discoveries: where a domain publishes its MTA-STS record
(C{_mta-sts.<domain>}, RFC 8461 §3.1) and its TLSRPT record
(C{_smtp._tls.<domain>}, RFC 8460 §3), looked up through an
L{IDNSResolver}, and which of the TXT strings is the record (the grammar is
L{mtasts_twisted.policy}'s).
"""

from __future__ import annotations

import functools

from mtasts_twisted.dns.errors import DNSNoRecordError
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.policy import (
    NoRecordError,
    STSRecord,
    TLSRPTRecord,
    select_sts_record,
    select_tlsrpt_record,
)

__all__ = ["lookup_sts_answer", "lookup_sts_record", "lookup_tlsrpt_record"]


# --- _mta-sts (RFC 8461 §3.1) ----------------------------------------------


async def lookup_sts_record(resolver: IDNSResolver, alabel: str) -> STSRecord:
    """
    Look up and select the STS record of C{alabel} (RFC 8461 §3.1).

    @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}.
    @raise NoRecordError: no TXT record, or none that is an STS record.
    @raise MultipleRecordsError: several STS records.
    @raise RecordSyntaxError: the STS record is malformed.
    @raise DNSTemporaryError: the lookup failed and may succeed later.
    """
    record, _ = await lookup_sts_answer(resolver, alabel)
    return record


async def lookup_sts_answer(resolver: IDNSResolver, alabel: str) -> tuple[STSRecord, int]:
    """
    L{lookup_sts_record}, also giving the TXT answer's TTL (seconds left).
    """
    try:
        answer = await resolver.lookup_txt("_mta-sts." + alabel)
    except DNSNoRecordError as e:
        raise NoRecordError(f"no TXT record at _mta-sts.{alabel}") from e
    return _select_sts_record(tuple(answer.strings)), answer.ttl


@functools.lru_cache(maxsize=4096)
def _select_sts_record(strings: tuple[str, ...]) -> STSRecord:
    """L{select_sts_record}, memoised: a cached TXT answer is not parsed again."""
    return select_sts_record(strings)


# --- _smtp._tls (RFC 8460 §3) ----------------------------------------------


async def lookup_tlsrpt_record(resolver: IDNSResolver, domain: str) -> TLSRPTRecord:
    """
    Look up and select the TLSRPT record of C{domain} (RFC 8460 §3).

    Unlike L{lookup_sts_record}, a definite negative DNS answer is not
    turned into L{NoRecordError}: it fails with the resolver's
    L{DNSNoRecordError}, so a caller can tell "no TXT at all" from "TXT,
    but no TLSRPT record among it".

    @param resolver: an L{mtasts_twisted.interfaces.IDNSResolver}.
    @param domain: the recipient domain, in A-labels.
    @return: the one TLSRPT record.
    @raise DNSNoRecordError: C{_smtp._tls.<domain>} does not exist or has no
        TXT records.
    @raise DNSTemporaryError: the lookup failed and may succeed later.
    @raise NoRecordError: TXT records, but none is a TLSRPT record.
    @raise MultipleRecordsError: several TLSRPT records (reason
        C{multiple-tlsrpt-records}).
    @raise RecordSyntaxError: the one TLSRPT record is malformed.
    @raise DomainError: C{domain} is not a valid DNS name.
    """
    # RFC 8460 §3: the reporting policy is at "_smtp._tls.<domain>".
    answer = await resolver.lookup_txt(f"_smtp._tls.{domain}")
    # RFC 8460 §3: not exactly one record: "assume the recipient domain does
    # not implement TLSRPT" (select_tlsrpt_record raises).
    return select_tlsrpt_record(answer.strings)
