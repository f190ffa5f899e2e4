"""
Client TLS for MX hosts that verifies I{and} records why verification failed.

RFC 8461 §4.1 requires the MX host's certificate to chain to a trusted root
and to be valid for the MX host name (RFC 6125; not for the recipient
domain), and RFC 8460 §4.3 wants a failure reported by kind:
certificate-expired, certificate-not-trusted, certificate-host-mismatch or
validation-failure.  L{twisted.internet.ssl.optionsForClientTLS} verifies,
but a failed connection only says "certificate verify failed".  So
L{MXConnectionCreator} wraps it: each connection it makes gets a
L{TLSOutcomeRecorder} of its own, the package's recording verify callback
(L{mtasts_twisted.pkix.VerifyRecorder}: the OpenSSL verify error numbers
with their depth and the service_identity outcome) plus an info callback
that records the TLS version, the cipher and any TLS alert, one per
C{clientConnectionForTLS} call.  L{TLSOutcome.classify} maps that record
to an RFC 8460 result type per docs/design.rst.

Three modes (L{VerifyMode}):

  - C{VERIFY} (policy mode C{enforce}): the first verification failure
    aborts the handshake; the connection is lost with a
    L{TLSVerificationError} that carries the L{TLSOutcome}.
  - C{RECORD_ONLY} (C{testing}, C{none}, no policy: opportunistic TLS): the
    handshake completes whatever the certificate; the outcome says
    C{verified=False} and why.
  - C{DANE} (a host with usable secure TLSA records, RFC 7672 §3): the
    TLSA records of a L{DANECheck} authenticate the presented chain instead
    of PKIX and the host name (L{mtasts_twisted.pkix.dane_verify}); a
    mismatch aborts the handshake as in C{VERIFY}; SNI is the TLSA base
    domain (C{server_name}, §8.1).

How delivery uses it (L{mtasts_twisted.delivery.Deliverer}, over its own
SMTP client protocol)::

    options = MXTLSOptionsCache(load_trust_root(ca_file))  # once per Deliverer
    # per session, after the MX host's 220 to STARTTLS:
    creator = options.creator(
        mx_host, VerifyMode.VERIFY if enforce else VerifyMode.RECORD_ONLY)
    transport.startTLS(creator)
    # after the EHLO that follows (or its failure):
    outcome = creator.outcome()             # None: TLS never started
    details = outcome.failure_details(ip)   # None if verified

The OpenSSL context is cached per MX host (L{MXTLSOptionsCache}); the
creator, and so the recorder, is per session.  STARTTLS not offered or
refused, and an MX host outside the policy, are reported by
L{mtasts_twisted.delivery.details}: they are not TLS outcomes.

twisted.mail's C{ESMTPSenderFactory} takes an L{MXConnectionCreator} as
its C{contextFactory} (C{ESMTPClient.esmtpState_starttls} hands it to
C{transport.startTLS}; tests/test_tls.py does so): a refused certificate
then fails the sender with an C{SMTPConnectError} whose C{__cause__} is the
L{TLSVerificationError}; a 454 to STARTTLS fails it with a
C{twisted.mail.smtp.TLSError} even when TLS is not required (RFC 3207 §4
leaves going on without TLS to the client).  L{mtasts_twisted.twistedmail}
is the hook that does this for twisted.mail users: per MX host the
planner's decision, a creator per connection
(L{SessionAttempt<mtasts_twisted.twistedmail.SessionAttempt>}), and
twisted.mail's outcomes turned into TLSRPT results
(L{classify<mtasts_twisted.twistedmail.classify>}).
"""

from __future__ import annotations

# The tests patch C{ssl.optionsForClientTLS} through this module.
from twisted.internet import ssl  # noqa: F401

from mtasts_twisted.tls.client import MXConnectionCreator, MXTLSOptionsCache, TLSOutcomeRecorder, load_trust_root
from mtasts_twisted.tls.outcome import TLSOutcome, TLSVerificationError, VerifyMode

__all__ = [
    "MXConnectionCreator",
    "MXTLSOptionsCache",
    "TLSOutcome",
    "TLSOutcomeRecorder",
    "TLSVerificationError",
    "VerifyMode",
    "load_trust_root",
]
