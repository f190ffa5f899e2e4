"""
Outbound delivery that enforces MTA-STS: MX list → policy filter → ESMTP
with STARTTLS → a per-recipient outcome plus TLSRPT results.

A relay hands every message to L{Deliverer.deliver} (or the one-off
L{deliver}), once per recipient domain::

    deliverer = Deliverer(reactor, resolver, cache, trust_root=None, sink=sink)
    result = await deliverer.deliver("alice@example.org",
                                     ["bob@example.com", "carol@example.com"],
                                     open("message.eml", "rb"))
    for outcome in result.outcomes:
        print(outcome.recipient, outcome.status.name, outcome.code, outcome.message)

What it does (RFC 8461 §4–§5, RFC 5321 §5):

  1. Looks the recipient domain's policy up in the L{PolicyCache
     <mtasts_twisted.cache.PolicyCache>}; a temporary lookup failure makes
     every recipient L{Status.TRANSIENT}.
  2. Looks up the MX hosts with our resolver (never the system's
     C{getaddrinfo}): by preference, shuffled within one preference
     (RFC 5321 §5.1), the implicit MX, a null MX (RFC 7505) → permanent.
  3. Per MX host, per address (IPv6 first, then IPv4; both capped), one
     connection to the address itself: greeting, EHLO, STARTTLS, EHLO again,
     one transaction (MAIL, one RCPT per recipient, DATA) for every
     recipient still pending, QUIT (or a parked session first, see
     "Session reuse").
  4. Per MX host, the policy decides (L{plan_host}).
     Policy C{enforce}: MX hosts outside the policy are skipped; STARTTLS
     is required and the certificate must verify (C{VerifyMode.VERIFY}:
     the handshake is aborted otherwise, so nothing of the message is
     ever sent in plaintext or over unverified TLS).  When every host
     fails, recipients are L{Status.TRANSIENT}, never permanent before a
     fresh policy check (RFC 8461 §5.1).  Policy C{testing}: the same
     checks in C{VerifyMode.RECORD_ONLY}; failures are reported and
     delivery goes on.  No policy or mode C{none}: opportunistic STARTTLS.

Opportunistic fallback (never under C{enforce}): a refused STARTTLS
(e.g. 454) goes on in plaintext on the same connection (RFC 3207 §4 leaves
that to the client); a failed TLS handshake is retried once on a new
connection to the same address without STARTTLS.

TLSRPT accounting (RFC 8460 §4; L{mtasts_twisted.delivery.accounting};
docs/design.rst "TLSRPT accounting"): every session is counted once, as
a success or a failure.  The results are the lookup's result (first, as
given) and one L{Result <mtasts_twisted.results.Result>} per I{TLS
negotiation}.

  - The lookup's result counts no session, unless its problem stopped the
    delivery: a temporary failure with nothing cached defers every
    recipient and counts as one failed session.  Any other lookup problem
    (the cached policy used because the TXT lookup or a new policy's fetch
    failed, a backoff, a first fetch that failed) did not stop the
    sessions that follow: it is a failure detail (its
    C{failed-session-count} the one delivery it affected) and adds
    nothing to C{total-failure-session-count}; those sessions are counted
    below as they went.  A verified session under a cached policy is a
    success, plus the lookup's failure detail (RFC 8460 §4: failure types
    are non-exclusive, details may overlap).

Sessions:

  - Under an C{sts} policy (C{enforce}, C{testing}): every session that
    reached the STARTTLS decision counts once: success when TLS was
    negotiated with a verified certificate, else a failure
    (C{starttls-not-supported}, the certificate's failure per
    L{TLSOutcome.classify<mtasts_twisted.tls.TLSOutcome.classify>}, or for
    an MX host outside the policy
    C{validation-failure}/C{mtasts-policy-mx-mismatch}, which wins over a
    TLS failure in C{testing}).  A host skipped under C{enforce} for not
    matching counts as one failure (no C{receiving-ip}, no
    C{sending-mta-ip}: nothing was connected).  The failure details of a
    session name its local address (C{sending-mta-ip}, RFC 8460 §4.4), the
    MX host and the address connected to.
  - Without a policy, or in mode C{none} (reported as
    C{no-policy-found}): a session whose TLS handshake completed counts as
    a success, verified or not (no policy asked for verification); a
    failed handshake counts as a failure; a session without TLS (STARTTLS
    not offered or refused) is not counted at all — there was no TLS
    negotiation to report, and no policy that required one.
  - Under DANE (C{DeliverySettings.dane}; RFC 7672): a host DANE decided
    (usable secure TLSA records, secure ones none usable, or a failed
    lookup) is counted under its C{tlsa} policy instead (policy-domain the
    TLSA base domain, reported to the recipient domain): every session
    once, success when TLS was negotiated and authenticated by the records
    (for records none usable, any TLS), else a failure (C{tlsa-invalid},
    C{starttls-not-supported}, ...); a host whose lookup failed counts as
    one C{dnssec-invalid} failure, nothing connected.
  - Sessions that ended before the STARTTLS decision (connection refused,
    timeout, a 4xx/5xx greeting or EHLO) are not counted: RFC 8460 has no
    result type for them and they say nothing about TLS.  The plaintext
    retry after a failed handshake is not counted either (its handshake
    already was).

Session reuse (L{mtasts_twisted.delivery.sessions}; connection caching;
off unless L{DeliverySettings.reuse_idle_time} is set): after a transaction whose
replies are all in, a session that negotiated TLS is parked instead of
closed, for at most C{reuse_idle_time} seconds, C{reuse_max_transactions}
transactions and C{reuse_max_age} seconds after connecting (Postfix:
C{smtp_connection_cache_time_limit}, C{smtp_connection_reuse_count_limit},
C{smtp_connection_reuse_time_limit}).  A later delivery reuses it only
when that is exactly as safe as a new session:

  - the same policy domain, MX host and port, and the same policy (mode,
    MX patterns, policy text, TXT id): a changed policy never inherits a
    session checked against the old one, and a C{testing} session never
    carries C{enforce} mail;
  - under C{enforce}, only a session verified with verification required
    (its handshake would have been aborted otherwise) to a host the
    policy lists;
  - the host is one the MX loop reaches in its normal order (a parked
    session may only move its host first among hosts of equal
    preference), at one of the addresses it would try; plaintext
    sessions and the plaintext retry are never kept.

A parked session is probed with RSET (RFC 5321 §4.1.1.5) before reuse;
anything from the server while parked (a 421, §3.8), a lost connection, a
failed RSET or a failure before the end of data leave the recipients
pending for a new connection as if there had been no parked session (no
TLSRPT result, no error in the outcome).  A reused session adds no TLSRPT
result: RFC 8460 §4 counts TLS sessions, and it was counted once when it
was negotiated.  L{Deliverer.close} (the relay's C{stopService}) says QUIT
to the parked sessions.

Replies: a 5xx to RCPT makes that recipient L{Status.PERMANENT}, a 4xx
L{Status.TRANSIENT}; accepted recipients go on to DATA in the same
transaction, and the reply to the final dot decides them.  A 4xx/5xx
greeting or EHLO, a 4xx to MAIL, a lost connection or a timeout before the
final dot move on to the next address / MX host.  A 5xx to MAIL or DATA is
permanent for every recipient of the transaction.  A connection lost after
the final dot was sent is transient and not retried elsewhere in this call
(the message may have been delivered, RFC 1047).  Under C{enforce} none of
these replies is ever read from a host whose certificate did not verify.

Messages: the file is scanned once in chunks before delivery (size for
C{SIZE}, RFC 1870, and whether it has 8-bit bytes), then streamed with
C{FileSender}, line ends normalised to CRLF and dot-stuffed (RFC 5321
§4.5.2).  It is never read whole into memory.  8-bit data needs the
server's C{8BITMIME} (sent as C{BODY=8BITMIME}, RFC 6152); otherwise the
recipients are L{Status.PERMANENT} (C{5.6.3}) — no downgrade to 7 bit is
attempted.  An address with a non-ASCII local part needs C{SMTPUTF8}
(RFC 6531); without it that address is L{Status.PERMANENT} (C{5.6.7}).
A non-ASCII domain in an address with an ASCII local part is sent as
A-labels and needs nothing.  A message submitted with C{SMTPUTF8}
(C{deliver(..., smtputf8=True)}) that has 8-bit data may have UTF-8
header fields (RFC 6532): it is sent with C{SMTPUTF8}, and a server
without it makes every recipient L{Status.PERMANENT} (C{5.6.9}); with
ASCII data it needs nothing (RFC 6531 §3.4).  A quoted local part is
sent quoted, with the least quoting (RFC 5321 §4.1.2).

Outcomes decided here rather than by a server reply (null MX, no such
domain, missing 8BITMIME, all hosts failed, ...) have C{code} L{None} and
a message starting with an RFC 3463 enhanced status code.

Why not twisted.mail's C{ESMTPSender}: it sends no C{BODY=}, C{SMTPUTF8}
or C{SIZE} parameters, fails the whole send on a 4xx/5xx to MAIL or DATA
without telling which stage, has no session timeout, needs a reconnect
after a 454 to STARTTLS, and its Deferred needs help to fire on TLS
failures when connected through endpoints (docs/design.rst).  The client
here is a small C{LineReceiver} driven by one coroutine per session.

Where it lives (data flows down the list; nothing imports a module above
it):

  - L{mtasts_twisted.delivery.protocol}: the SMTP client protocol: reply
    parsing, EHLO keywords, DATA encoding (dot-stuffing), address encoding.
  - L{mtasts_twisted.delivery.values}: L{Status}, L{DeliverySettings},
    L{RecipientOutcome}, L{DeliveryResult}, L{MessageInfo},
    L{scan_message}, and the L{Envelope} every transaction sends.
  - L{mtasts_twisted.delivery.plan}: MX order and the MTA-STS decision per
    MX host (L{plan_attempts}, L{PlannedHost}), pure.
  - L{mtasts_twisted.delivery.attempt}: the records of one session
    (L{Attempt<mtasts_twisted.delivery.attempt.Attempt>}, what it did;
    L{Connection<mtasts_twisted.delivery.attempt.Connection>}, a session
    past its setup).
  - L{mtasts_twisted.delivery.starttls}: STARTTLS in a session and its
    TLSRPT decision.
  - L{mtasts_twisted.delivery.dialogue}: one session: greeting, EHLO,
    STARTTLS, one transaction, QUIT.
  - L{mtasts_twisted.delivery.accounting}: the TLSRPT results of skipped
    hosts and sessions.
  - L{mtasts_twisted.delivery.logline}: the one log line per recipient and
    delivery attempt (C{to=<…>, relay=host[ip]:port, delay=…, tls=…,
    policy=…, dsn=…, status=sent|deferred|bounced (reply)}).
  - L{mtasts_twisted.delivery.sessions}: session reuse (L{SessionPool}, the
    reuse rules).
  - L{mtasts_twisted.delivery.runner}: one session of a delivery, new or
    parked, ending in one L{Attempt<mtasts_twisted.delivery.attempt.Attempt>}.
  - L{mtasts_twisted.delivery.verdict}: the outcomes decided without a
    server's reply (a failed lookup, no MX host took the message), pure.
  - L{mtasts_twisted.delivery.deliverer}: L{Deliverer} and L{deliver}: the
    lookups and the course through the MX hosts.
"""

from mtasts_twisted.delivery.deliverer import Deliverer, DeliveryReactor, PolicySource, deliver
from mtasts_twisted.delivery.dialogue import CLOSE_TIMEOUT, QUIT_TIMEOUT
from mtasts_twisted.delivery.plan import (
    DeliveryPlan,
    HostAction,
    PlannedHost,
    order_mx_hosts,
    plan_attempts,
    plan_host,
)
from mtasts_twisted.delivery.protocol import ClientProtocol, DataEncoder
from mtasts_twisted.delivery.sessions import RSET_TIMEOUT, SessionPool
from mtasts_twisted.delivery.verdict import MAX_ERRORS_SHOWN
from mtasts_twisted.delivery.values import (
    CHUNK_SIZE,
    DeliveryResult,
    DeliverySettings,
    Envelope,
    MessageInfo,
    RecipientOutcome,
    Status,
    scan_message,
)

# The names these had when delivery was one module (tests, the
# reliability report).
_ClientProtocol = ClientProtocol
_DataEncoder = DataEncoder

__all__ = [
    "CHUNK_SIZE",
    "CLOSE_TIMEOUT",
    "MAX_ERRORS_SHOWN",
    "QUIT_TIMEOUT",
    "RSET_TIMEOUT",
    "Deliverer",
    "DeliveryPlan",
    "DeliveryReactor",
    "DeliveryResult",
    "DeliverySettings",
    "Envelope",
    "HostAction",
    "MessageInfo",
    "PlannedHost",
    "PolicySource",
    "RecipientOutcome",
    "SessionPool",
    "Status",
    "deliver",
    "order_mx_hosts",
    "plan_attempts",
    "plan_host",
    "scan_message",
]
