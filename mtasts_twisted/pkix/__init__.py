"""
Certificate verification shared by every TLS client of the package: the
policy fetch (RFC 8461 §3.3), the MX connections (RFC 8461 §4.1, RFC 7672
§3) and the https report sender (RFC 8460 §5.4).

What they must agree on lives here, once:

  - L{load_trust_roots}: the one reader of trust roots (C{--ca-file}, PEM
    bytes, a certificate, the platform's store).
  - L{classify_verify_error}: the one table from an OpenSSL X.509 verify
    error to the RFC 8460 §4.3.1 result type it counts as (docs/design.rst,
    "TLS failure → RFC 8460 result type"), with L{verify_error_name} and
    L{deciding_verify_error}.
  - L{VerifyRecorder}: the one recording verify callback, one per
    connection: OpenSSL's PKIX verdict plus the RFC 6125 host-name check,
    recording why verification failed (a failed handshake alone only says
    "certificate verify failed").
  - L{client_context} and L{RecordingConnectionCreator}: one OpenSSL context
    built once and shared, with SNI and a L{VerifyRecorder} per connection
    (the policy fetch, the report sender).  C{mtasts_twisted.tls} builds its
    MX connections on L{VerifyRecorder} too.
  - L{dane_verify}: DANE authentication of a chain by TLSA records (RFC
    7672 §3): DANE-EE(3) matches, DANE-TA(2) anchors with OpenSSL's path
    validation and the name checks of §3.2.2–§3.2.3.

The rooms, bottom to top: L{roots <mtasts_twisted.pkix.roots>},
L{errors <mtasts_twisted.pkix.errors>},
L{recorder <mtasts_twisted.pkix.recorder>} and
L{dane <mtasts_twisted.pkix.dane>}.  Callers import from this
package; the rooms are free to move.
"""

from mtasts_twisted.pkix.dane import (
    DANECheck,
    DANEVerdict,
    dane_name_matches,
    dane_verify,
    subject_public_key_info,
    tlsa_association_data,
    tlsa_matches,
)
from mtasts_twisted.pkix.errors import (
    EXPIRED_ERRORS,
    NOT_TRUSTED_ERRORS,
    VerifyErrorClass,
    classify_verify_error,
    deciding_verify_error,
    verify_error_name,
)
from mtasts_twisted.pkix.recorder import (
    CertificateVerifyError,
    RecordingConnectionCreator,
    VerifyRecorder,
    certificate_names,
    client_context,
)
from mtasts_twisted.pkix.roots import TrustRootSpec, load_trust_roots

__all__ = [
    "EXPIRED_ERRORS",
    "NOT_TRUSTED_ERRORS",
    "CertificateVerifyError",
    "DANECheck",
    "DANEVerdict",
    "RecordingConnectionCreator",
    "TrustRootSpec",
    "VerifyErrorClass",
    "VerifyRecorder",
    "certificate_names",
    "classify_verify_error",
    "client_context",
    "dane_name_matches",
    "dane_verify",
    "deciding_verify_error",
    "load_trust_roots",
    "subject_public_key_info",
    "tlsa_association_data",
    "tlsa_matches",
    "verify_error_name",
]
