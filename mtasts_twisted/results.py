"""
The RFC 8460 §4 result model: value types and their JSON form.

These sit low in the package because every layer produces them: the policy
cache yields one per lookup, delivery one per attempt, and
L{mtasts_twisted.tlsrpt} aggregates them into reports.  Pure: no I/O.
"""

from __future__ import annotations

import enum
import re
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


#: RFC 3986 §3.1: an absolute URI starts with a scheme and a colon.
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z")


def is_uri(value: str) -> bool:
    """
    Whether C{value} looks like an absolute URI (RFC 3986 §3: a scheme, a
    colon, and no white space), the form of RFC 8460 §4.4
    C{additional-information}.
    """
    return _URI.match(value) is not None


def _uri_or_none(instance: Any, attribute: Any, value: str | None) -> None:
    # RFC 8460 §4.4: "additional-info-uri (optional): A URI [RFC3986] that
    # points to additional information".  Human text belongs in logs.
    if value is not None and not is_uri(value):
        raise ValueError(f"additional-information must be a URI (RFC 8460 §4.4), not {value[:60]!r}")


@attrs.frozen
class FailureDetails:
    """
    RFC 8460 §4.3 ``failure-details`` element.

    Two details that differ only in C{failed_session_count} describe the
    same failure; L{key} identifies them for aggregation.

    @ivar sending_mta_ip: the local address of the session (RFC 8460 §4.4
        C{sending-mta-ip}); L{None} for a failure without a session (a
        policy lookup, an MX host skipped before connecting).
    @ivar additional_information: a URI (RFC 8460 §4.4
        C{additional-info-uri}) or L{None}; anything else is refused with
        L{ValueError}.  Free error text goes to the log instead, so equal
        failures merge.
    """

    result_type: ResultType
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    failed_session_count: int = 1
    additional_information: str | None = attrs.field(default=None, validator=_uri_or_none)
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
        """
        Inverse of L{to_json}.  An C{additional-information} that is not a
        URI (free text stored by versions before RFC 8460 §4.4 was
        followed) is dropped.
        """
        kwargs = {attr: obj[name] for attr, name in _DETAIL_FIELDS if name in obj}
        kwargs["result_type"] = ResultType(kwargs["result_type"])
        info = kwargs.get("additional_information")
        if info is not None and not (isinstance(info, str) and is_uri(info)):
            del kwargs["additional_information"]
        return cls(**kwargs)


def _details(value: Any) -> tuple[FailureDetails, ...]:
    return tuple(value)


def _sessions_failed(result: Result) -> int:
    return sum(f.failed_session_count for f in result.failures)


@attrs.frozen
class Result:
    """
    One RFC 8460 §4 ``policies[]`` element: a policy, the count of
    successful and of failed sessions, and the failures seen under it.

    Sessions are counted once each (RFC 8460 §4.2), in C{success_count} or
    C{failure_count}; the failure details say what went wrong and may
    overlap (RFC 8460 §4: "a single send attempt encountered multiple
    errors"), so their C{failed-session-count}s add up to at least
    C{failure_count}, and more when a detail describes a problem that did
    not fail a session (a policy lookup that fell back to the cached
    policy; see "TLSRPT accounting" in docs/design.rst).

    @ivar failure_count: RFC 8460 §4.2 C{total-failure-session-count};
        by default the sum of the details' C{failed_session_count} (each
        detail one failed session).  A policy lookup whose problem did not
        stop delivery passes 0: a failure detail, not a session.
    @ivar report_domain: the domain whose TLSRPT record (C{_smtp._tls},
        RFC 8460 §3) the result is reported to, when it is not the
        policy's C{policy_domain}: a C{tlsa} policy's domain is the TLSA
        base domain of an MX host (RFC 8460 §3 "Policy Domain"), reported
        to the recipient domain.  Not part of the JSON form nor of
        equality (the aggregator keys results by it, L{reported_to}).
    """

    policy: PolicyDescriptor
    success_count: int = 0
    failures: tuple[FailureDetails, ...] = attrs.field(default=(), converter=_details)
    failure_count: int = attrs.field(default=attrs.Factory(_sessions_failed, takes_self=True))
    report_domain: str | None = attrs.field(default=None, eq=False, kw_only=True)

    @property
    def reported_to(self) -> str:
        """The domain the result is reported to: C{report_domain}, else the policy domain."""
        return self.report_domain or self.policy.policy_domain

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
            failure_count=obj["summary"]["total-failure-session-count"],
        )
