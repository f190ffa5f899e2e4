"""
MTA-STS policy discovery over the network: the C{_mta-sts} TXT record and
the policy fetched over HTTPS (RFC 8461 §3.1, §3.3).

  - L{mtasts_twisted.fetch.fetcher}: L{PolicyFetcher}, the HTTPS GET of the
    policy and its rules (no redirects, C{text/plain}, the size cap, one
    timeout).
  - L{mtasts_twisted.fetch.errors}: how a fetch fails, each error with its
    RFC 8460 result type and failure-reason-code.
  - L{mtasts_twisted.fetch.endpoint}: the connection to the policy host
    through our resolver, with the package's recording verify callback
    (L{mtasts_twisted.pkix}).
  - L{mtasts_twisted.fetch.discovery}: L{discover} (the TXT record of
    L{mtasts_twisted.dns.records}, then the policy; no cache).

Every public name is importable from C{mtasts_twisted.fetch}.
"""

from mtasts_twisted.fetch.discovery import Discovery, discover
from mtasts_twisted.fetch.errors import (
    FetchTimeoutError,
    InvalidPolicyError,
    NoPolicyServedError,
    PolicyCertificateError,
    PolicyFetchError,
    PolicyTooLargeError,
    WrongContentTypeError,
)
from mtasts_twisted.fetch.fetcher import (
    DEFAULT_TIMEOUT,
    MAX_POLICY_SIZE,
    FetchedPolicy,
    PolicyFetcher,
    fetch_policy,
    policy_url,
)
from mtasts_twisted.pkix import load_trust_roots

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_POLICY_SIZE",
    "Discovery",
    "FetchedPolicy",
    "PolicyFetchError",
    "NoPolicyServedError",
    "WrongContentTypeError",
    "FetchTimeoutError",
    "PolicyCertificateError",
    "InvalidPolicyError",
    "PolicyTooLargeError",
    "PolicyFetcher",
    "discover",
    "fetch_policy",
    "policy_url",
    "load_trust_roots",
]
