"""
The answers: from the policy that applies to a next hop to the text of the
Postfix socketmap reply.  Pure (no I/O, no clock): the server looks up the
policy and, when a wildcard needs them, the MX hosts, and hands them here.

A reply is C{OK <data>}, C{NOTFOUND }, C{TEMP <reason>}, C{TIMEOUT <reason>}
or C{PERM <reason>}, at most L{MAX_REPLY} characters (socketmap_table(5)).
One example per case follows; "the peer" (postfix-mta-sts-resolver)
answers the same unless noted:

  - enforce, exact patterns only (no C{*.}): the patterns, without an MX
    lookup (Postfix checks the certificate of whichever MX host it reaches
    against this list, so listing the patterns is exactly as strict)::

        OK secure match=mx1.example.com:mx2.example.com servername=hostname

  - enforce with a wildcard pattern, MX hosts known::

        OK secure match=mx1.example.com:mx7.example.net servername=hostname

    The peer answers C{match=.example.net} for an C{mx: *.example.net}
    pattern, but Postfix's C{.example.net} matches any depth of subdomain
    while an MTA-STS wildcard matches exactly one label (RFC 8461 §4.1).  We
    list the domain's actual MX hosts that match the policy instead, so
    C{mx.sub.example.net} is never accepted.  The MX answer comes from our
    resolver (TTL cached) and the server memoises the rendered answer per
    policy domain, policy object and record id until the MX TTL ends.
  - enforce, MX lookup failed temporarily: the peer's form, with a warning
    logged by the server (at most once per C{mx_retry} seconds and domain)::

        OK secure match=mx1.example.com:.example.com servername=hostname

  - enforce with a wildcard, no MX host matches the policy: the policy's exact
    patterns only; Postfix then fails TLS verification with every MX and
    defers the mail, which is what RFC 8461 §5.1 asks for under enforce::

        OK secure match=mx1.example.com servername=hostname

    When the policy has only wildcard patterns there is no safe C{match}
    list (C{.example.com} would admit the very hosts that do not match), so
    we answer C{TEMP}: Postfix defers the mail ("temporarily fail the
    message", RFC 8461 §5.1) without connecting anywhere::

        TEMP no MX host of example.com matches its MTA-STS policy

  - testing, mode none, no policy, address literals (C{[192.0.2.1]}, bare
    IPs) and parent-domain keys (C{.example.com})::

        NOTFOUND 

  - testing with C{strict_testing}: answered like enforce.
  - C{tlsrpt_attributes} (Postfix >= 3.10, TLSRPT_README "MTA-STS support"):
    the enforce answer gains the policy attributes; values with spaces use
    Postfix's C{{ name = value }} form::

        OK secure match=mx1.example.com servername=hostname policy_type=sts
        policy_domain=example.com mx_host_pattern=mx1.example.com
        mx_host_pattern=*.example.com { policy_string = version: STSv1 }
        { policy_string = mode: enforce } ...

    (one line on the wire).  Postfix has no report-only TLS security level,
    so a testing policy is answered with C{testing_level} (default C{may}:
    opportunistic TLS, what Postfix does anyway with the stock
    C{smtp_tls_security_level}) plus the attributes, so Postfix delivers as
    it would without MTA-STS but knows the policy to report under::

        OK may policy_type=sts policy_domain=example.com mx_host_pattern=...

    An operator whose default level is C{dane} or C{encrypt} should set
    C{testing_level} to that level (a C{may} answer would override it for
    testing domains), or to L{None} to answer C{NOTFOUND } as without
    attributes.
  - temporary failure with nothing cached (the cache's
    L{PolicyLookupTemporaryError<mtasts_twisted.cache.PolicyLookupTemporaryError>})::

        TEMP MTA-STS policy of example.com unavailable (dns-lookup)

    or C{NOTFOUND } with C{fail_open}.

With C{SocketmapSettings.dane} the server asks
L{mtasts_twisted.socketmap.dane} first, before any of these answers but
C{NOTFOUND }: where DANE applies it answers C{OK dane-only}, C{OK dane} or
C{TEMP} instead, without TLSRPT attributes; where it does not, the answer
is the one above.

Operator overrides (L{mtasts_twisted.overrides}) reach the server through
its policy source, so the answers follow the same decision as the relay's:

  - C{enforce} override: its policy, answered like any enforce policy
    (C{OK secure match=...}), but never with the TLSRPT attributes (they
    would name an C{sts} policy the domain did not publish, RFC 8460
    §4.1);
  - C{skip} override: no policy (C{NOTFOUND });
  - C{dane-only} override (L{override_answer}), Postfix's own level::

        OK dane-only
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from mtasts_twisted.cache import Lookup
from mtasts_twisted.overrides import OverriddenLookup, OverrideKind
from mtasts_twisted.policy import Mode, Policy
from mtasts_twisted.socketmap.settings import DEFAULT_SETTINGS, SocketmapSettings

__all__ = [
    "ANSWER_KINDS",
    "MAX_REPLY",
    "NOTFOUND",
    "answer_kind",
    "answer_settings",
    "cached_answer",
    "fixed_answer",
    "needs_mx_hosts",
    "override_answer",
    "policy_has_wildcard",
    "render_answer",
    "render_failure",
]

#: socketmap_table(5): "replies are not longer than 100000 characters".
MAX_REPLY = 100000

#: The answer kinds counted in L{SocketmapFactory.counts
#: <mtasts_twisted.socketmap.server.SocketmapFactory.counts>} and passed to
#: the C{metrics} counter as its C{answer} label (see L{answer_kind}).
ANSWER_KINDS = ("ok", "notfound", "temp", "perm")

#: The reply for "no policy applies" (socketmap_table(5): the key is not found).
NOTFOUND = "NOTFOUND "


def _dedupe(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _policy_attributes(policy_domain: str, policy: Policy, strings: bool = True, patterns: bool = True) -> str:
    """The TLSRPT attributes of Postfix >= 3.10 for C{policy}, with a leading space."""
    parts = [" policy_type=sts policy_domain=", policy_domain]
    if patterns:
        for pattern in policy.mx:
            parts.append(" mx_host_pattern=")
            parts.append(pattern)
    if strings:
        for line in policy.policy_strings:
            if "{" in line or "}" in line:
                # Postfix's "{ name = value }" cannot carry an unbalanced
                # brace; such an extension line is left out of the report.
                continue
            parts.append(" { policy_string = ")
            parts.append(line.strip())
            parts.append(" }")
    return "".join(parts)


def _with_attributes(head: str, policy_domain: str, policy: Policy, settings: SocketmapSettings) -> str:
    if not settings.tlsrpt_attributes:
        return head
    answer = head + _policy_attributes(policy_domain, policy)
    if len(answer) > MAX_REPLY:
        # Keep within socketmap_table(5)'s limit: the policy strings go first.
        answer = head + _policy_attributes(policy_domain, policy, strings=False)
    if len(answer) > MAX_REPLY:
        answer = head + _policy_attributes(policy_domain, policy, strings=False, patterns=False)
    return answer


def render_answer(
    policy_domain: str,
    policy: Policy | None,
    settings: SocketmapSettings = DEFAULT_SETTINGS,
    mx_hosts: Sequence[str] | None = None,
) -> str:
    """
    The socketmap reply (without netstring framing) for a policy.

    Pure: no I/O.  See the module docstring for the formats.

    @param policy_domain: the policy domain in A-labels.
    @param policy: the policy that applies, or L{None} for none.
    @param mx_hosts: the hosts Postfix may connect to (the domain's MX hosts
        in preference order, or the host of a C{[host]} key), in A-labels;
        L{None} when they are unknown (the MX lookup failed temporarily), which
        falls back to the peer's pattern form (C{*.x} written C{.x}).
    @return: C{"OK ..."}, C{"NOTFOUND "} or, for an enforced policy that no
        MX host matches and that has no exact pattern, C{"TEMP ..."}.
    """
    if policy is None or policy.mode is Mode.NONE:
        return "NOTFOUND "
    if policy.mode is Mode.TESTING and not settings.strict_testing:
        if settings.tlsrpt_attributes and settings.testing_level:
            return _with_attributes("OK " + settings.testing_level, policy_domain, policy, settings)
        return "NOTFOUND "
    if mx_hosts is None:
        # The patterns themselves.  For a wildcard this is the peer's form:
        # Postfix's ".x" admits any depth below x, more than RFC 8461 §4.1's
        # one label; so it is used only when the MX hosts are unknown.
        names = _dedupe(p[1:] if p.startswith("*.") else p for p in policy.mx)
        if not names:
            return f"TEMP MTA-STS policy of {policy_domain} lists no MX host"
    else:
        # RFC 8461 §4.1: only MX hosts matching a pattern are candidates.
        names = _dedupe(h.lower().rstrip(".") for h in mx_hosts if policy.matches(h))
        if not names:
            # No MX host matches: exact patterns only; Postfix fails the
            # verification against every MX and defers (RFC 8461 §5.1).
            names = _dedupe(p for p in policy.mx if not p.startswith("*."))
        if not names:
            return f"TEMP no MX host of {policy_domain} matches its MTA-STS policy"
    head = "OK secure match=" + ":".join(names) + " servername=hostname"
    answer = _with_attributes(head, policy_domain, policy, settings)
    if len(answer) > MAX_REPLY:
        return f"TEMP MTA-STS answer for {policy_domain} exceeds the socketmap reply limit"
    return answer


def policy_has_wildcard(policy: Policy) -> bool:
    """Has C{policy} a C{*.} pattern (whose match list needs the MX hosts)?"""
    return any(pattern.startswith("*.") for pattern in policy.mx)


def render_failure(policy_domain: str, reason: str, settings: SocketmapSettings = DEFAULT_SETTINGS) -> str:
    """
    The reply when the policy cannot be determined now and nothing usable is
    cached: C{TEMP <reason>} (Postfix defers the mail), or C{NOTFOUND } with
    C{fail_open} (Postfix delivers with its default TLS level).

    @param reason: a short machine reason, e.g. C{dns-lookup}.
    """
    if settings.fail_open:
        return "NOTFOUND "
    return f"TEMP MTA-STS policy of {policy_domain} unavailable ({reason})"


def answer_kind(text: str) -> str:
    """
    The kind of the reply C{text} (one of L{ANSWER_KINDS} for the replies
    rendered here): its first word in lower case.
    """
    return text.partition(" ")[0].lower()


def override_answer(lookup: Lookup) -> str | None:
    """
    The reply an operator override fixes whatever the policy says: C{OK
    dane-only} for a C{dane-only} override (Postfix then requires DANE for
    the next hop and defers without usable TLSA records); else L{None}.
    """
    if isinstance(lookup, OverriddenLookup) and lookup.override is not None:
        if lookup.override.kind is OverrideKind.DANE_ONLY:
            return "OK dane-only"
    return None


def answer_settings(lookup: Lookup, settings: SocketmapSettings) -> SocketmapSettings:
    """
    The settings to render C{lookup}'s policy with: C{settings}, without
    the TLSRPT attributes when an C{enforce} override supplied the policy
    (RFC 8460 §4.1: the attributes would report it as the domain's
    published C{sts} policy).
    """
    if (settings.tlsrpt_attributes and isinstance(lookup, OverriddenLookup) and lookup.override is not None
            and lookup.override.kind is OverrideKind.ENFORCE):
        return attrs.evolve(settings, tlsrpt_attributes=False)
    return settings


def fixed_answer(lookup: Lookup, settings: SocketmapSettings) -> str | None:
    """
    The reply to C{lookup} that no next hop can change, or L{None}: an
    override's (L{override_answer}), or L{NOTFOUND} when no policy applies
    (none, mode C{none}, or C{testing} answered as none: without
    C{strict_testing} and without the testing attributes).  L{None} means
    the reply sets a TLS level: L{render_answer}'s, after the next hop's
    DANE verdict with C{settings.dane}, with the MX hosts where
    L{needs_mx_hosts}.  The server's first step, and the status page's.
    """
    if type(lookup) is not Lookup:
        # Only a policy source's OverriddenLookup carries an override (the
        # cache's plain Lookup, the hot path, needs no second call).
        fixed = override_answer(lookup)
        if fixed is not None:
            return fixed
    policy = lookup.policy
    if policy is None or policy.mode is Mode.NONE:
        return NOTFOUND
    if policy.mode is Mode.TESTING and not settings.strict_testing and not (
            settings.tlsrpt_attributes and settings.testing_level):
        return NOTFOUND
    return None


def needs_mx_hosts(policy: Policy, settings: SocketmapSettings) -> bool:
    """
    Whether the reply for C{policy} (one that sets a TLS level) lists the
    domain's MX hosts: an enforced policy (C{enforce}, or C{testing} with
    C{strict_testing}) with a C{*.} pattern, whose match list is the MX
    hosts that match it (RFC 8461 §4.1: one label; see the module
    docstring).  Exact patterns are listed as they are.
    """
    enforced = policy.mode is Mode.ENFORCE or (policy.mode is Mode.TESTING and settings.strict_testing)
    return enforced and policy_has_wildcard(policy)


def cached_answer(policy_domain: str, lookup: Lookup, settings: SocketmapSettings) -> str | None:
    """
    The reply to C{lookup} for the next hop C{policy_domain} as far as it
    is known without a DNS query (the status page): L{fixed_answer}, else
    the rendered answer when it needs neither the next hop's DANE verdict
    (C{settings.dane}) nor its MX hosts (L{needs_mx_hosts}); L{None} when
    it needs either.
    """
    fixed = fixed_answer(lookup, settings)
    if fixed is not None:
        return fixed
    policy = lookup.policy
    assert policy is not None, "fixed_answer answers a lookup without a policy"
    if settings.dane or needs_mx_hosts(policy, settings):
        return None
    return render_answer(policy_domain, policy, answer_settings(lookup, settings))
