"""
How a DNS lookup fails: L{DNSError} and its two kinds, a definite negative
answer (L{DNSNoRecordError}) and a failure that may pass
(L{DNSTemporaryError}).

Like every L{MTASTSError}, each carries a short, stable C{reason}
(C{dns-lookup}, C{dns-no-record}).
"""

from __future__ import annotations

from mtasts_twisted.policy import MTASTSError

__all__ = ["DNSError", "DNSNoRecordError", "DNSTemporaryError"]


class DNSError(MTASTSError):
    """
    Base of DNS lookup failures.

    @ivar name: the name looked up (A-labels, no trailing dot).
    @ivar rdtype: the record type looked up, as text (C{"TXT"}).
    @ivar server: the nameserver that gave the decisive answer
        (C{"IP:PORT"}), or L{None}.
    """

    reason = "dns-lookup"

    def __init__(self, message: str, name: str = "", rdtype: str = "", server: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.rdtype = rdtype
        self.server = server


class DNSNoRecordError(DNSError):
    """
    A definite negative answer: the name does not exist (NXDOMAIN) or has no
    records of the type asked for (NODATA).

    @ivar nxdomain: C{True} for NXDOMAIN, C{False} for NODATA.
    @ivar secure: the denial is DNSSEC-secure: the validating resolver set
        the AD bit on every reply of it, CNAMEs included (RFC 7672 §2.2:
        "DNSSEC-authenticated denial of existence"); C{False} for an
        insecure denial.
    """

    reason = "dns-no-record"

    def __init__(
        self,
        message: str,
        name: str = "",
        rdtype: str = "",
        server: str | None = None,
        nxdomain: bool = False,
        secure: bool = False,
    ) -> None:
        super().__init__(message, name, rdtype, server)
        self.nxdomain = nxdomain
        self.secure = secure


class DNSTemporaryError(DNSError):
    """
    A lookup that may succeed later: SERVFAIL, REFUSED, timeout, malformed
    reply, network error, broken CNAME chain or exhausted time budget.

    A validating resolver answers SERVFAIL for a DNSSEC "bogus" or
    "indeterminate" answer, so those end here too: RFC 7672 §2.1.1 equates
    them with lookup failure, never with "no records".

    @ivar detail: what went wrong, per server tried, e.g.
        C{"SERVFAIL from 127.0.0.1:5353"}.
    """

    reason = "dns-lookup"

    def __init__(
        self, message: str, name: str = "", rdtype: str = "", server: str | None = None, detail: str = ""
    ) -> None:
        super().__init__(message, name, rdtype, server)
        self.detail = detail
