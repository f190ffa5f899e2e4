"""
L{OverridingPolicySource}: the one policy source of the relay's
L{Deliverer<mtasts_twisted.delivery.Deliverer>}, the socketmap and
C{mtasts-twisted lookup}: the policy cache's C{get} with the operator's
overrides (L{mtasts_twisted.overrides.parse}) and the C{--enforce-as-testing}
switch applied.  It answers a L{Lookup} like the cache, so both accept it
unchanged; when an override or the switch decided, the answer is an
L{OverriddenLookup} saying which.

What each override does to the answer (the cache is always asked, so the
domain's own policy and its TLSRPT lookup result stay known):

  - C{enforce}: the policy is the override's (mode C{enforce}, its C{mx});
    the TLSRPT result stays the lookup's (RFC 8460 §4.1: the C{policy}
    object describes what the domain published: C{no-policy-found} when it
    publishes nothing, never an C{sts} policy it did not publish).  A
    temporary lookup failure does not defer: the override decides, and the
    failure is a detail that counts no session.
  - C{skip}: no policy (delivery as without MTA-STS; sessions counted as
    without a policy); the lookup's result is reported as usual.  Logged on
    every use.
  - C{dane-only}: the policy stays the domain's; the socketmap answers
    Postfix's C{dane-only}.  The relay (C{defer_dane_only}) does not do
    DANE yet, so it defers the domain's mail (L{PolicyLookupTemporaryError},
    4.4.3) rather than deliver with less than DANE; with
    C{--enforce-as-testing} it delivers under the domain's policy as
    testing.
  - C{--enforce-as-testing}: every C{enforce} policy (the domain's or an
    override's) is applied in mode C{testing}: delivered, and reported
    under the policy as published.  Logged loudly at start and on use (at
    most once per domain per L{USE_LOG_INTERVAL}).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtasts_twisted.cache import Lookup, PolicyLookupTemporaryError
from mtasts_twisted.overrides.parse import Override, OverrideFileError, OverrideKind, load_overrides
from mtasts_twisted.policy import Mode, Policy
from mtasts_twisted.results import PolicyDescriptor, PolicyType, Result

__all__ = [
    "CachePolicySource",
    "apply_override",
    "OverrideTable",
    "OverriddenLookup",
    "OverridingPolicySource",
    "USE_LOG_INTERVAL",
]

log = Logger()

#: Seconds between two "applied as testing" lines for one domain.
USE_LOG_INTERVAL = 60.0


class CachePolicySource(Protocol):
    """What is wrapped: L{PolicyCache.get<mtasts_twisted.cache.PolicyCache.get>}."""

    def get(self, domain: str, /) -> Deferred[Lookup]:
        """The L{Lookup} of C{domain}; fails with L{PolicyLookupTemporaryError}."""


@attrs.frozen
class OverriddenLookup(Lookup):
    """
    A L{Lookup} that an override or C{--enforce-as-testing} decided.

    @ivar override: the L{Override} that decided, or L{None} (only the
        switch did).
    @ivar as_testing: C{--enforce-as-testing} turned an C{enforce} policy
        into C{testing}.
    @ivar published: the policy the domain's own lookup gave (L{None} for
        none or a failed lookup), for C{lookup} and logs.
    """

    override: Override | None = None
    as_testing: bool = False
    published: Policy | None = None


class OverrideTable:
    """
    The overrides in force, and their file: reloaded on SIGHUP (L{reload}),
    keeping the previous map when the new file is malformed.

    @ivar path: the file, or L{None} (no overrides).
    @ivar overrides: the overrides by A-label domain.
    @ivar reloads: C{{"ok": n, "failed": n}}.
    @ivar last_error: the one-line error of the last failed reload, or L{None}.
    """

    def __init__(self, path: str | None = None, overrides: Mapping[str, Override] | None = None) -> None:
        """
        @param path: the overrides file (read again by L{reload}).
        @param overrides: the parsed overrides (see L{load}).
        """
        self.path = path
        self.overrides: Mapping[str, Override] = dict(overrides or {})
        self.reloads: Counter[str] = Counter()
        self.last_error: str | None = None

    @classmethod
    def load(cls, path: str) -> OverrideTable:
        """
        Read C{path}.

        @raise OverrideFileError: it cannot be read or is malformed (one line).
        """
        table = cls(path, load_overrides(path))
        log.info("policy overrides: {count} domain(s) from {path}", count=len(table.overrides), path=path)
        return table

    def reload(self) -> bool:
        """
        Read the file again.  On success the new map replaces the old one;
        on failure the old one stays and the reason is logged.

        @return: whether the new file is in force.
        """
        if self.path is None:
            return False
        try:
            overrides = load_overrides(self.path)
        except OverrideFileError as e:
            self.reloads["failed"] += 1
            self.last_error = str(e)
            log.error("policy overrides NOT reloaded, keeping the previous {count} domain(s): {error}",
                      count=len(self.overrides), error=str(e))
            return False
        self.overrides = overrides
        self.reloads["ok"] += 1
        self.last_error = None
        log.info("policy overrides reloaded: {count} domain(s) from {path}", count=len(overrides), path=self.path)
        return True

    def find(self, domain: str, now: float) -> Override | None:
        """The override of C{domain} (A-labels) in force at C{now}, or L{None}."""
        override = self.overrides.get(domain)
        if override is None or not override.active(now):
            return None
        return override


def _no_session(result: Result) -> Result:
    """A stopped lookup's result as a detail only: the override decided, no session was stopped."""
    return Result(result.policy, 0, result.failures, failure_count=0)


def _as_testing(policy: Policy) -> Policy:
    return attrs.evolve(policy, mode=Mode.TESTING)


def apply_override(lookup: Lookup, domain: str, override: Override | None, *, enforce_as_testing: bool,
                   defer_dane_only: bool) -> OverriddenLookup:
    """
    C{lookup} of C{domain} with C{override} (in force now, or L{None}) and
    the C{--enforce-as-testing} switch applied (see the module docstring).
    Pure: L{OverridingPolicySource} counts and logs around it.

    @raise PolicyLookupTemporaryError: a C{dane-only} override under
        C{defer_dane_only} without the switch (the relay defers the mail).
    """
    policy, record_id = lookup.policy, lookup.record_id
    if override is not None:
        if override.kind is OverrideKind.SKIP:
            # The domain's MTA-STS is ignored: delivery as without a policy.
            policy, record_id = None, None
        elif override.kind is OverrideKind.ENFORCE:
            policy, record_id = override.policy, None
        elif defer_dane_only and not enforce_as_testing:
            raise PolicyLookupTemporaryError(
                f"{domain} requires DANE (policy override dane-only, {override.source}), "
                "which this relay does not do yet", _no_session(lookup.result))
    as_testing = False
    if enforce_as_testing and policy is not None and policy.mode is Mode.ENFORCE:
        policy, as_testing = _as_testing(policy), True
    return OverriddenLookup(policy, lookup.result, lookup.fresh, record_id, lookup.entry, lookup.error,
                            override=override, as_testing=as_testing, published=lookup.policy)


class OverridingPolicySource:
    """
    A policy source (C{get(domain) -> Deferred[Lookup]}) over the policy
    cache, with the overrides and C{--enforce-as-testing} applied (see the
    module docstring).

    @ivar table: the L{OverrideTable}.
    @ivar enforce_as_testing: the switch.
    @ivar uses: how often each decided: C{enforce}, C{skip}, C{dane-only}
        (override kinds) and C{enforce-as-testing}.
    """

    def __init__(
        self,
        cache: CachePolicySource,
        table: OverrideTable,
        clock: IReactorTime,
        *,
        enforce_as_testing: bool = False,
        defer_dane_only: bool = False,
        uses: Counter[str] | None = None,
    ) -> None:
        """
        @param cache: the L{PolicyCache<mtasts_twisted.cache.PolicyCache>}.
        @param table: the overrides.
        @param clock: when overrides expire (C{until}).
        @param enforce_as_testing: apply every C{enforce} policy as
            C{testing}.
        @param defer_dane_only: for delivery without DANE (no C{--dane}): a
            C{dane-only} domain's mail is deferred; else the lookup is
            marked (C{override}) and a DANE-enabled L{Deliverer} sends only
            to DANE-authenticated hosts, the socketmap answers
            C{dane-only}.
        @param uses: a counter to share between sources (the relay's and
            the socketmap's), or L{None} for a new one.
        """
        self._cache = cache
        self.table = table
        self._clock = clock
        self.enforce_as_testing = enforce_as_testing
        self._defer_dane_only = defer_dane_only
        self.uses: Counter[str] = uses if uses is not None else Counter()
        self._logged: dict[str, float] = {}

    def get(self, domain: str, /) -> Deferred[Lookup]:
        """
        The L{Lookup} of C{domain} (A-labels) with the overrides applied;
        fails with L{PolicyLookupTemporaryError} as the cache does (and for
        a C{dane-only} domain under C{defer_dane_only}).
        """
        override = self.table.find(domain, self._clock.seconds())
        if override is None and not self.enforce_as_testing:
            # The common path: the cache's own answer, untouched.
            return self._cache.get(domain)
        return self._cache.get(domain).addCallbacks(
            self._decide, self._decide_failed, callbackArgs=(domain, override), errbackArgs=(domain, override))

    def _decide_failed(self, failure: Any, domain: str, override: Override | None) -> Any:
        error = failure.value
        if override is None or not isinstance(error, PolicyLookupTemporaryError):
            return failure
        # The override decides without the domain's policy.
        lookup = Lookup(None, _no_session(error.result), False, error=str(error))
        return self._decide(lookup, domain, override)

    def _decide(self, lookup: Lookup, domain: str, override: Override | None) -> Lookup:
        if override is not None:
            self.uses[override.kind.value] += 1
            if override.kind is OverrideKind.SKIP:
                log.warn("policy override: skipping the MTA-STS policy of {domain} until {until} ({reason}; {source})",
                         domain=domain, until=override.to_json()["until"], reason=override.reason or "no reason given",
                         source=override.source)
        try:
            decided = apply_override(lookup, domain, override, enforce_as_testing=self.enforce_as_testing,
                                     defer_dane_only=self._defer_dane_only)
        except PolicyLookupTemporaryError:
            log.info("policy override: {domain} is dane-only; deferring (DANE is not wired into delivery yet)",
                     domain=domain)
            raise
        if decided.as_testing:
            self.uses["enforce-as-testing"] += 1
            self._log_as_testing(domain)
        return decided

    def applied(self, lookup: Lookup | None, domain: str) -> Lookup | None:
        """
        What L{get} makes of C{lookup} (a cache answer, e.g. L{PolicyCache.peek
        <mtasts_twisted.cache.PolicyCache.peek>}'s) for C{domain} (A-labels),
        by the same rules (L{apply_override}) but counting and logging
        nothing: the status page's verdict.  With nothing cached (L{None})
        an override still decides, as when the lookup fails; without one
        the answer stays L{None}.

        @raise PolicyLookupTemporaryError: as L{get} (a C{dane-only} domain
            under C{defer_dane_only}).
        """
        override = self.table.find(domain, self._clock.seconds())
        if override is None and not self.enforce_as_testing:
            return lookup
        if lookup is None:
            if override is None:
                return None
            lookup = Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain)), False)
        return apply_override(lookup, domain, override, enforce_as_testing=self.enforce_as_testing,
                              defer_dane_only=self._defer_dane_only)

    def _log_as_testing(self, domain: str) -> None:
        now = self._clock.seconds()
        last = self._logged.get(domain)
        if last is not None and now - last < USE_LOG_INTERVAL:
            return
        if len(self._logged) > 10000:
            self._logged.clear()
        self._logged[domain] = now
        log.warn("--enforce-as-testing: the enforce policy of {domain} is applied as testing "
                 "(mail is delivered whatever the TLS checks say)", domain=domain)
