"""
A lookup's consequence in words, for operators: what a sender does with
the policy that applies (L{sender_action}) and which override decided
(L{override_text}).  Shared by C{mtasts-twisted lookup} and the status
page's verdict, so both say the same.  Pure.
"""

from __future__ import annotations

from mtasts_twisted.cache import Lookup
from mtasts_twisted.overrides.parse import Override, OverrideKind
from mtasts_twisted.policy import Mode

__all__ = ["ACTIONS", "override_text", "sender_action"]

#: What a sender does under each mode (RFC 8461 §5), or without a policy (L{None}).
ACTIONS = {
    Mode.ENFORCE: "deliver only over STARTTLS with a verified certificate, to MX hosts the policy names",
    Mode.TESTING: "deliver as usual, and report what would have failed under enforce",
    Mode.NONE: "deliver as usual (opportunistic TLS); the domain asks for no enforcement",
    None: "deliver as usual (opportunistic TLS): no MTA-STS policy applies",
}


def sender_action(lookup: Lookup, relay_dane: bool | None = None) -> str:
    """
    What a sender would do for C{lookup}, with its override (if any)
    applied.

    @param relay_dane: whether the relay delivers with DANE (C{--dane}):
        it then sends a C{dane-only} domain's mail to DANE-authenticated
        hosts only, else defers it; L{None} when not known (the CLI).
    """
    override = getattr(lookup, "override", None)
    if override is not None and override.kind is OverrideKind.DANE_ONLY:
        head = "deliver only over DANE-authenticated TLS (socketmap: dane-only); "
        if relay_dane is None:
            return head + "a relay without --dane defers this domain's mail"
        if relay_dane:
            return head + "the relay sends only to MX hosts DANE authenticates (RFC 7672)"
        return head + "the relay (no --dane) defers this domain's mail"
    policy = lookup.policy
    return ACTIONS[policy.mode if policy else None]


def override_text(override: Override) -> str:
    """
    An override in one line: its kind and C{FILE:LINE}, then its C{mx},
    end and reason when it has them.
    """
    text = f"{override.kind.value} ({override.source})"
    if override.policy is not None:
        text += ", mx " + " ".join(override.policy.mx)
    if override.until is not None:
        text += f", until {override.to_json()['until']}"
    return text + (f": {override.reason}" if override.reason else "")
