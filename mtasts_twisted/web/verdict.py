"""
The domain page's verdict: what the service would answer for a domain
right now, from what it already holds, made by the code that makes the
answers themselves and never by a lookup (no DNS query, no policy fetch,
nothing counted or logged):

  1. the policy cache's answer without DNS
     (L{PolicyCache.peek<mtasts_twisted.cache.PolicyCache.peek>});
  2. the operator's overrides and C{--enforce-as-testing} on it, as the
     socketmap's policy source applies them
     (L{OverridingPolicySource.applied
     <mtasts_twisted.overrides.OverridingPolicySource.applied>});
  3. the socketmap's reply (L{cached_answer
     <mtasts_twisted.socketmap.answers.cached_answer>}), or, where that
     needs the MX hosts or a DANE verdict, the reply the socketmap
     memoised (L{SocketmapFactory.memoised
     <mtasts_twisted.socketmap.SocketmapFactory.memoised>}), if any;
  4. what the relay does, in the words of C{mtasts-twisted lookup}
     (L{sender_action<mtasts_twisted.overrides.sender_action>}).

L{verdict_of} is pure;
L{gather_verdict<mtasts_twisted.web.sources.gather_verdict>} reads the components.
"""

from __future__ import annotations


import attrs

from mtasts_twisted.cache import Lookup
from mtasts_twisted.overrides import OverriddenLookup, override_text, sender_action
from mtasts_twisted.socketmap.answers import cached_answer, needs_mx_hosts
from mtasts_twisted.socketmap.settings import SocketmapSettings
from mtasts_twisted.web.timestamps import format_time


__all__ = ["NO_LOOKUP", "Verdict", "verdict_of"]

#: How the page labels the verdict.
NO_LOOKUP = "from the cache, no lookup made"


@attrs.frozen
class Verdict:
    """
    What the service would answer for a domain now, from what it holds.

    @ivar domain: the domain in A-labels (or as asked, when it is none).
    @ivar answer: the socketmap's reply, or L{None} when it needs a lookup
        this page does not make.
    @ivar how: where C{answer} comes from, or why there is none.
    @ivar cached: whether the cache holds an answer for the domain.
    @ivar mode: the mode of the policy applied, or C{-} for none.
    @ivar mx: the C{mx} patterns of the policy applied.
    @ivar confirmed: whether DNS confirmed the policy within its TXT TTL
        (else the cached copy stands until the next lookup asks).
    @ivar override: the override that decides, in one line, or C{""}.
    @ivar as_testing: C{--enforce-as-testing} turned C{enforce} into
        C{testing}.
    @ivar relay: what the relay does with the domain's mail.
    @ivar problem: the cached answer's problem (a backoff after a failed
        fetch), or C{""}.
    """

    domain: str
    answer: str | None
    how: str
    cached: bool = False
    mode: str = "-"
    mx: tuple[str, ...] = ()
    confirmed: bool = False
    override: str = ""
    as_testing: bool = False
    relay: str = ""
    problem: str = ""


def verdict_of(
    domain: str,
    lookup: Lookup | None,
    settings: SocketmapSettings,
    memo: tuple[str, float] | None = None,
    *,
    cached: bool = True,
    relay_dane: bool = False,
) -> Verdict:
    """
    The L{Verdict} for C{domain} (A-labels) of C{lookup}.

    @param lookup: the cache's answer with the overrides applied, or
        L{None}: nothing cached and no override (the next request looks
        the domain up).
    @param settings: the socketmap's settings.
    @param memo: the socketmap's memoised reply for C{lookup} and when it
        expires, if any.
    @param cached: whether the cache held C{lookup} (an override may
        decide without it).
    @param relay_dane: whether the relay delivers with DANE (C{--dane}).
    """
    if lookup is None:
        return Verdict(domain, None, "not cached: the next request for it looks the policy up "
                                     "(mtasts-twisted lookup DOMAIN looks now)")
    answer = cached_answer(domain, lookup, settings)
    policy = lookup.policy
    if answer is not None:
        how = ("as the socketmap answers it from the cache" if cached
               else "as the socketmap answers it: the override decides whatever a lookup finds (nothing cached)")
    elif memo is not None:
        answer, how = memo[0], f"as the socketmap memoised it, until {format_time(memo[1])} UTC"
    elif settings.dane:
        how = "needs the DANE verdict of its MX hosts (--dane), not looked up here"
    else:
        assert policy is not None and needs_mx_hosts(policy, settings)
        how = ("lists the MX hosts matching " + ", ".join(policy.mx)
               + " (a wildcard matches one label): needs the domain's MX answer, not looked up here")
    override = lookup.override if isinstance(lookup, OverriddenLookup) else None
    return Verdict(
        domain, answer, how, cached,
        mode=policy.mode.value if policy is not None else "-",
        mx=tuple(policy.mx) if policy is not None else (),
        confirmed=lookup.fresh,
        override=override_text(override) if override is not None else "",
        as_testing=isinstance(lookup, OverriddenLookup) and lookup.as_testing,
        relay=sender_action(lookup, relay_dane),
        problem=lookup.error or "",
    )
