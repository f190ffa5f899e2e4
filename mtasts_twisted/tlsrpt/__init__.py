"""
SMTP TLS Reporting (RFC 8460): aggregation of results and daily reports.

The result value types live in L{mtasts_twisted.results} because the policy
cache and delivery produce them; they are re-exported here.
"""

from mtasts_twisted.results import (
    FailureDetails,
    PolicyDescriptor,
    PolicyType,
    Result,
    ResultType,
)

__all__ = ["FailureDetails", "PolicyDescriptor", "PolicyType", "Result", "ResultType"]
