"""
Operator overrides (C{--policy-overrides FILE}, C{--enforce-as-testing}):
one policy source over the policy cache that the relay's deliverer, the
socketmap and C{mtasts-twisted lookup} all ask.

  - L{mtasts_twisted.overrides.parse}: the TOML file → frozen L{Override}
    values (pure);
  - L{mtasts_twisted.overrides.source}: L{OverrideTable} (the map in
    force, reloaded on SIGHUP) and L{OverridingPolicySource} (the cache's
    C{get} with the overrides applied → L{OverriddenLookup}, by
    L{apply_override});
  - L{mtasts_twisted.overrides.describe}: a lookup's consequence in words
    (L{sender_action}, L{override_text}) for C{lookup} and the status page.
"""

from mtasts_twisted.overrides.parse import (
    ENFORCE_MAX_AGE,
    Override,
    OverrideFileError,
    OverrideKind,
    load_overrides,
    parse_overrides,
)
from mtasts_twisted.overrides.source import (
    USE_LOG_INTERVAL,
    OverriddenLookup,
    OverrideTable,
    OverridingPolicySource,
    apply_override,
)
from mtasts_twisted.overrides.describe import ACTIONS, override_text, sender_action

__all__ = [
    "ACTIONS",
    "ENFORCE_MAX_AGE",
    "USE_LOG_INTERVAL",
    "Override",
    "OverrideFileError",
    "OverrideKind",
    "OverriddenLookup",
    "OverrideTable",
    "OverridingPolicySource",
    "apply_override",
    "load_overrides",
    "override_text",
    "parse_overrides",
    "sender_action",
]
