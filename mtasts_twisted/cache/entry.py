"""
The cached state of one policy domain: L{CacheEntry}, a row of the
L{POLICY_TABLE} shelf (JSON, never pickle).
"""

from __future__ import annotations

from typing import Any

import attrs

from mtasts_twisted.policy import Policy, parse_policy
from mtasts_twisted.results import FailureDetails

__all__ = ["POLICY_TABLE", "CacheEntry"]

#: The shelf of the store that holds the cache entries.
POLICY_TABLE = "policies"


@attrs.frozen
class CacheEntry:
    """
    The cached state of one policy domain (a row of the C{policies} table).

    @ivar domain: the domain in Unicode (the store key).
    @ivar alabel: the domain in A-labels.
    @ivar policy: the cached policy, or L{None} when only a backoff is cached.
    @ivar valid_end: POSIX time until which C{policy} may be used (RFC 8461 §3.2
        C{max_age} after it was last confirmed).
    @ivar backoff_id: the TXT id whose policy fetch last failed, if any.
    @ivar backoff_until: no fetch for C{backoff_id} before this time.
    @ivar backoff_failure: the failure that started the backoff (for reports).
    """

    domain: str
    alabel: str
    inserted: float
    last_update: float
    last_use: float
    record_id: str | None = None
    policy: Policy | None = None
    valid_end: float = 0.0
    backoff_id: str | None = None
    backoff_until: float = 0.0
    backoff_failure: FailureDetails | None = None

    def valid(self, now: float) -> bool:
        """Is there a policy that may still be used at C{now}?"""
        return self.policy is not None and now < self.valid_end

    def in_backoff(self, now: float, record_id: str | None = None) -> bool:
        """Is a fetch (for C{record_id}, when given) backing off at C{now}?"""
        if now >= self.backoff_until:
            return False
        return record_id is None or record_id == self.backoff_id

    def to_json(self) -> dict[str, Any]:
        """The row as stored (JSON, never pickle)."""
        policy = self.policy
        return {
            "domain": self.domain,
            "alabel": self.alabel,
            "inserted": self.inserted,
            "last_update": self.last_update,
            "last_use": self.last_use,
            "record_id": self.record_id,
            "valid_end": self.valid_end,
            "mode": policy.mode.value if policy else None,
            "max_age": policy.max_age if policy else None,
            "mx": list(policy.mx) if policy else None,
            "policy_text": policy.text if policy else None,
            "backoff": self.backoff_until > 0,
            "backoff_id": self.backoff_id,
            "backoff_until": self.backoff_until,
            "backoff_failure": self.backoff_failure.to_json() if self.backoff_failure else None,
        }

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CacheEntry:
        """Inverse of L{to_json}; the policy is re-parsed from its raw text."""
        policy = None
        if row.get("policy_text") is not None:
            policy = parse_policy(row["policy_text"])
        failure = row.get("backoff_failure")
        return cls(
            domain=row["domain"],
            alabel=row["alabel"],
            inserted=row["inserted"],
            last_update=row["last_update"],
            last_use=row["last_use"],
            record_id=row.get("record_id"),
            policy=policy,
            valid_end=row.get("valid_end", 0.0),
            backoff_id=row.get("backoff_id"),
            backoff_until=row.get("backoff_until", 0.0),
            backoff_failure=FailureDetails.from_json(failure) if failure else None,
        )
