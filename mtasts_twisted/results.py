"""
The RFC 8460 §4 result model: value types and their JSON form.

These sit low in the package because every layer produces them: the policy
cache yields one per lookup, delivery one per attempt, and
L{mtasts_twisted.tlsrpt} aggregates them into reports.  Pure: no I/O.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs


class PolicyType(str, enum.Enum):
    """RFC 8460 §4.1 ``policy-type``."""

    STS = "sts"
    TLSA = "tlsa"
    NO_POLICY_FOUND = "no-policy-found"


class ResultType(str, enum.Enum):
    """RFC 8460 §4.3 ``result-type`` values (with RFC 8460's final names)."""

    # §4.3.1 negotiation failures
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    # §4.3.2 policy failures
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class PolicyDescriptor:
    """
    RFC 8460 §4.1 ``policy`` object.

    @ivar policy_strings: the policy lines as received (empty for
        no-policy-found).
    @ivar policy_domain: the policy domain, in A-labels.
    @ivar mx_hosts: the policy's ``mx`` patterns, as written.
    """

    policy_type: PolicyType
    policy_domain: str
    policy_strings: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    mx_hosts: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def to_json(self) -> dict[str, Any]:
        """Return the RFC 8460 JSON object."""
        out: dict[str, Any] = {
            "policy-type": self.policy_type.value,
            "policy-domain": self.policy_domain,
        }
        if self.policy_strings:
            out["policy-string"] = list(self.policy_strings)
        if self.mx_hosts:
            out["mx-host"] = list(self.mx_hosts)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PolicyDescriptor:
        """Inverse of L{to_json}."""
        return cls(
            policy_type=PolicyType(obj["policy-type"]),
            policy_domain=obj["policy-domain"],
            policy_strings=obj.get("policy-string", ()),
            mx_hosts=obj.get("mx-host", ()),
        )


_DETAIL_FIELDS = (
    ("result_type", "result-type"),
    ("sending_mta_ip", "sending-mta-ip"),
    ("receiving_mx_hostname", "receiving-mx-hostname"),
    ("receiving_mx_helo", "receiving-mx-helo"),
    ("receiving_ip", "receiving-ip"),
    ("failed_session_count", "failed-session-count"),
    ("additional_information", "additional-information"),
    ("failure_reason_code", "failure-reason-code"),
)


@attrs.frozen
class FailureDetails:
    """
    RFC 8460 §4.3 ``failure-details`` element.

    Two details that differ only in C{failed_session_count} describe the
    same failure; L{key} identifies them for aggregation.
    """

    result_type: ResultType
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    failed_session_count: int = 1
    additional_information: str | None = None
    failure_reason_code: str | None = None

    def key(self) -> tuple[Any, ...]:
        """Everything but the count: equal keys merge in a report."""
        return attrs.astuple(attrs.evolve(self, failed_session_count=0))

    def to_json(self) -> dict[str, Any]:
        """Return the RFC 8460 JSON object (absent fields omitted)."""
        out: dict[str, Any] = {}
        for attr, name in _DETAIL_FIELDS:
            value = getattr(self, attr)
            if value is not None:
                out[name] = value.value if attr == "result_type" else value
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FailureDetails:
        """Inverse of L{to_json}."""
        kwargs = {attr: obj[name] for attr, name in _DETAIL_FIELDS if name in obj}
        kwargs["result_type"] = ResultType(kwargs["result_type"])
        return cls(**kwargs)


def _details(value: Any) -> tuple[FailureDetails, ...]:
    return tuple(value)


@attrs.frozen
class Result:
    """
    One RFC 8460 §4 ``policies[]`` element: a policy, the count of
    successful sessions and the failures seen under it.

    A policy lookup yields a result with no sessions (and a failure when
    the lookup failed); a delivery attempt yields one session.
    """

    policy: PolicyDescriptor
    success_count: int = 0
    failures: tuple[FailureDetails, ...] = attrs.field(default=(), converter=_details)

    @property
    def failure_count(self) -> int:
        """RFC 8460 §4.2 ``total-failure-session-count``."""
        return sum(f.failed_session_count for f in self.failures)

    def to_json(self) -> dict[str, Any]:
        """Return the RFC 8460 ``policies[]`` element."""
        out: dict[str, Any] = {
            "policy": self.policy.to_json(),
            "summary": {
                "total-successful-session-count": self.success_count,
                "total-failure-session-count": self.failure_count,
            },
        }
        if self.failures:
            out["failure-details"] = [f.to_json() for f in self.failures]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Result:
        """Inverse of L{to_json}."""
        return cls(
            policy=PolicyDescriptor.from_json(obj["policy"]),
            success_count=obj["summary"]["total-successful-session-count"],
            failures=[FailureDetails.from_json(f) for f in obj.get("failure-details", ())],
        )
