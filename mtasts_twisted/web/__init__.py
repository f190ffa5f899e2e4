"""
The read-only status pages of C{twistd mtasts} (C{--web}), served with
twisted.web, charts drawn as SVG on the server (no script).

  - L{data <mtasts_twisted.web.data>}: the pages' frozen values and the
    pure functions that make them.
  - L{sources <mtasts_twisted.web.sources>}: what the pages read
    (L{WebSources}) and the coroutines that read it.
  - L{sampler <mtasts_twisted.web.sampler>}: per-hour counts of running
    totals (the socketmap's answers).
  - L{verdict <mtasts_twisted.web.verdict>}: what the service would answer
    for a domain now, from the cache (no lookup made).
  - L{dane <mtasts_twisted.web.dane>}: DANE status per domain from today's
    stored TLSRPT results.
  - L{chart <mtasts_twisted.web.chart>}: SVG charts.
  - L{pages <mtasts_twisted.web.pages>}: rendering (twisted.web.template,
    so every value is escaped).
  - L{server <mtasts_twisted.web.server>}: the resource, the bounded
    L{WebSite}.
  - L{auth <mtasts_twisted.web.auth>}: basic authentication and bearer
    tokens (L{protect}), L{requires_auth}.

Nothing of the package imports this one except the service.
"""

from mtasts_twisted.web.sampler import CounterSampler
from mtasts_twisted.web.auth import protect, read_password_file, read_token_file, requires_auth
from mtasts_twisted.web.server import StatusResource, WebLimits, WebSite
from mtasts_twisted.web.sources import WebSources

__all__ = ["CounterSampler", "StatusResource", "WebLimits", "WebSite", "WebSources", "protect", "read_password_file",
           "read_token_file", "requires_auth"]
