"""
MTA-STS (and TLSRPT) for relays built on twisted.mail's own ESMTP sender.

The per-MX-host decision is the one L{Deliverer
<mtasts_twisted.delivery.Deliverer>} uses
(L{mtasts_twisted.delivery.plan}); this package drives
C{twisted.mail.smtp.ESMTPSenderFactory} by it.

  - L{attempts<mtasts_twisted.twistedmail.attempts>}: one connection
    (L{SessionAttempt}: host, address, port, the verifying-and-recording
    TLS creator for C{contextFactory}, whether TLS is required) and what
    it ended with (L{classify} → L{AttemptOutcome}).
  - L{sender<mtasts_twisted.twistedmail.sender>}: twisted.mail's sender
    factory for one attempt (L{RecordingSenderFactory}, L{send_attempt}).
  - L{routes<mtasts_twisted.twistedmail.routes>}: the ordered attempts of a
    recipient domain (L{Router}, L{Route}) and their TLSRPT accounting.
  - L{domain<mtasts_twisted.twistedmail.domain>}: one message to one
    domain's MX hosts with failover (L{DomainSender}).
  - L{sendmail<mtasts_twisted.twistedmail.sendmail>}: the drop-in for
    C{twisted.mail.smtp.sendmail} (L{MTASTSSender}).
  - L{context<mtasts_twisted.twistedmail.context>}: the one-call wiring of
    resolver, store, cache, refresher and reports (L{MTASTSContext}).

C{twisted.mail.relaymanager}'s smart host managers do not run on Python 3
(tests/test_twistedmail_relaymanager.py shows where); README.rst, "Adding
MTA-STS to a twisted.mail relay", says how to move to L{MTASTSSender}.
"""

from mtasts_twisted.twistedmail.attempts import (
    AttemptOutcome,
    SessionAttempt,
    SessionObservation,
    classify,
    requirements,
)
from mtasts_twisted.twistedmail.context import ContextError, ContextSettings, MTASTSContext
from mtasts_twisted.twistedmail.domain import DomainSender
from mtasts_twisted.twistedmail.routes import Route, RouteHost, Router, Unroutable
from mtasts_twisted.twistedmail.sender import RecordingSender, RecordingSenderFactory, send_attempt
from mtasts_twisted.twistedmail.sendmail import (
    MTASTSDeliveryError,
    MTASTSSender,
    RequireTLSUnsupportedError,
    SendmailResult,
)

__all__ = [
    "AttemptOutcome",
    "ContextError",
    "ContextSettings",
    "DomainSender",
    "MTASTSContext",
    "MTASTSDeliveryError",
    "MTASTSSender",
    "RecordingSender",
    "RecordingSenderFactory",
    "RequireTLSUnsupportedError",
    "Route",
    "RouteHost",
    "Router",
    "SendmailResult",
    "SessionAttempt",
    "SessionObservation",
    "Unroutable",
    "classify",
    "requirements",
    "send_attempt",
]
