"""
The recording side of MX TLS: L{TLSOutcomeRecorder} (the package's verify
callback plus an info callback, per connection), L{MXTLSOptionsCache} (one
OpenSSL context per MX host) and L{MXConnectionCreator} (the
C{IOpenSSLClientConnectionCreator} a session hands to C{startTLS}).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mtasts_twisted.pkix import DANECheck, TrustRootSpec, VerifyRecorder, load_trust_roots
from mtasts_twisted.tls.outcome import TLSOutcome, TLSVerificationError, VerifyMode, _ascii_hostname

__all__ = ["MXConnectionCreator", "MXTLSOptionsCache", "TLSOutcomeRecorder", "load_trust_root"]

# The package is the log namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.tls")

#: L{mtasts_twisted.pkix.load_trust_roots}, under the name delivery imports.
load_trust_root = load_trust_roots


# RFC 8446 §6 / RFC 5246 §7.2 AlertDescription values.
_ALERT_NAMES: Mapping[int, str] = {
    0: "close-notify",
    10: "unexpected-message",
    20: "bad-record-mac",
    22: "record-overflow",
    40: "handshake-failure",
    42: "bad-certificate",
    43: "unsupported-certificate",
    44: "certificate-revoked",
    45: "certificate-expired",
    46: "certificate-unknown",
    47: "illegal-parameter",
    48: "unknown-ca",
    49: "access-denied",
    50: "decode-error",
    51: "decrypt-error",
    70: "protocol-version",
    71: "insufficient-security",
    80: "internal-error",
    86: "inappropriate-fallback",
    90: "user-canceled",
    109: "missing-extension",
    110: "unsupported-extension",
    112: "unrecognized-name",
    113: "bad-certificate-status-response",
    115: "unknown-psk-identity",
    116: "certificate-required",
    120: "no-application-protocol",
}


class TLSOutcomeRecorder(VerifyRecorder):
    """
    Records what happens on one TLS connection; made by
    L{MXConnectionCreator.clientConnectionForTLS}.

    The package's recording verify callback (L{VerifyRecorder}: verify
    errors, the name check, the refusal under C{VERIFY}) plus an info
    callback for the TLS version, cipher and alerts.  Its callbacks run
    inside OpenSSL; they never raise.

    @ivar mode: the L{VerifyMode}.
    """

    def __init__(self, hostname: str, mode: VerifyMode, dane: DANECheck | None = None) -> None:
        """
        @param hostname: the MX host name (A-labels) to check against.
        @param mode: the L{VerifyMode}.
        @param dane: under L{VerifyMode.DANE}, what to authenticate by.
        @raise ValueError: C{DANE} without C{dane}, or C{dane} in another
            mode.
        """
        if (mode is VerifyMode.DANE) != (dane is not None):
            raise ValueError("VerifyMode.DANE goes with a DANECheck, and only it")
        super().__init__(hostname, enforce=mode in (VerifyMode.VERIFY, VerifyMode.DANE), dane=dane)
        self.mode = mode
        self._completed = False
        self._version: str | None = None
        self._cipher: str | None = None
        self._alerts: list[str] = []

    def outcome(self) -> TLSOutcome:
        """Return what has been recorded so far as a L{TLSOutcome}."""
        errors: list[int] = []
        for _, errnum in self.errors:
            if errnum not in errors:
                errors.append(errnum)
        return TLSOutcome(
            hostname=self.hostname,
            mode=self.mode,
            handshake_completed=self._completed,
            tls_version=self._version,
            cipher=self._cipher,
            peer_certificate_names=self.names,
            verify_errors=tuple(errors),
            verify_error_depths=tuple(self.errors),
            certificate_checked=self.certificate_checked,
            host_mismatch=self.host_mismatch,
            alerts=tuple(self._alerts),
            internal_error=self.internal_error,
            dane_verdict=self.dane_verdict,
        )

    def _attach(self, connection: SSL.Connection, tlsProtocol: TLSMemoryBIOProtocol) -> None:
        # Per-connection callbacks (pyOpenSSL Connection.set_verify and
        # set_info_callback): the SSL.Context is shared by every connection
        # of the creator, and pyOpenSSL refuses to mutate a used Context.
        # They replace what optionsForClientTLS installed on the connection
        # (Twisted 26.4+ checks the name in its verify callback; older ones
        # did it in a Context info callback, which a connection's own info
        # callback overrides too); test_record_only_wrong_name pins that.
        self.attach(connection, tlsProtocol)
        connection.set_info_callback(self._info)

    def refusal(self) -> Exception:
        """
        Under C{VERIFY}, at the first failure: log it and give the
        L{TLSVerificationError} the connection is lost with.
        """
        outcome = self.outcome()
        # Debug: the delivery's line per recipient gives the reason.
        log.debug("TLS to {hostname} refused: {error}", hostname=self.hostname, error=TLSVerificationError(outcome))
        return TLSVerificationError(outcome)

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        try:
            if where & SSL.SSL_CB_ALERT:
                direction = "received" if where & SSL.SSL_CB_READ else "sent"
                description = ret & 0xFF
                name = _ALERT_NAMES.get(description, str(description))
                self._alerts.append(f"{direction}:{name}")
            if where & SSL.SSL_CB_HANDSHAKE_DONE and not self._completed:
                if self.mode is VerifyMode.DANE and not self.passed:
                    # Never mail over a DANE connection whose certificate
                    # was not checked (OpenSSL always calls back for it;
                    # this is the belt to that brace).
                    self._refuse()
                self._completed = True
                self._protocol = None
                self._version = connection.get_protocol_version_name()
                self._cipher = connection.get_cipher_name()
                # One event per session (operators and the benchmark count
                # verified sessions); TLSOutcome.verified without building one.
                log.debug(
                    "TLS to {hostname}: {version} {cipher}, verified={verified}",
                    hostname=self.hostname,
                    version=self._version,
                    cipher=self._cipher,
                    verified=self.passed,
                )
        except BaseException:
            log.failure("while recording TLS state for {hostname}", hostname=self.hostname)
            self.internal_error = True


class MXTLSOptionsCache:
    """
    Twisted client TLS options for MX hosts, one per host name, for one
    trust root: each holds one OpenSSL context (cipher list, TLS ≥ 1.2,
    the loaded trust store), built on first use and then shared by every
    connection to that host.  Building a context and loading the trust
    store is the costly part of a TLS client setup; per connection only an
    C{SSL.Connection} is made, with its own verify and info callbacks
    (L{TLSOutcomeRecorder}), so verification stays per connection and as
    strict as with fresh options.  The verify mode is per connection too,
    so one entry serves C{VERIFY} and C{RECORD_ONLY}.

    @ivar max_hosts: host names kept (least recently used dropped first).
    """

    def __init__(self, trust_root: TrustRootSpec = None, *, max_hosts: int = 1024) -> None:
        """
        @param trust_root: anything L{load_trust_root} takes (loaded once).
        @param max_hosts: how many host names to keep options for.
        """
        self._trust_root = load_trust_root(trust_root)
        self.max_hosts = max_hosts
        self._options: OrderedDict[str, IOpenSSLClientConnectionCreator] = OrderedDict()

    def options(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """
        The C{optionsForClientTLS} of C{hostname} (A-labels): SNI and the
        trust root; the name check is done by L{TLSOutcomeRecorder}.
        """
        options = self._options.get(hostname)
        if options is None:
            options = ssl.optionsForClientTLS(
                hostname,
                trustRoot=self._trust_root,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
            )
            self._options[hostname] = options
            if len(self._options) > self.max_hosts:
                self._options.popitem(last=False)
        else:
            self._options.move_to_end(hostname)
        return options

    def creator(
        self,
        hostname: str,
        mode: VerifyMode = VerifyMode.VERIFY,
        *,
        dane: DANECheck | None = None,
        server_name: str | None = None,
    ) -> MXConnectionCreator:
        """
        A new L{MXConnectionCreator} for C{hostname} using the cached
        options (see there for C{dane} and C{server_name}).
        """
        return MXConnectionCreator(hostname, mode=mode, cache=self, dane=dane, server_name=server_name)


@implementer(IOpenSSLClientConnectionCreator)
class MXConnectionCreator:
    """
    TLS client connection creator for one MX host: SNI, PKIX and name
    verification (RFC 8461 §4.1), TLS ≥ 1.2, and a L{TLSOutcomeRecorder}
    per connection.

    @ivar hostname: the MX host name (A-labels, no trailing dot).
    @ivar mode: the L{VerifyMode}.
    @ivar recorders: one L{TLSOutcomeRecorder} per connection made, oldest
        first.
    """

    def __init__(
        self,
        hostname: str,
        trust_root: TrustRootSpec = None,
        *,
        mode: VerifyMode = VerifyMode.VERIFY,
        cache: MXTLSOptionsCache | None = None,
        dane: DANECheck | None = None,
        server_name: str | None = None,
    ) -> None:
        """
        @param hostname: the MX host name: SNI and the name checked
            (RFC 8461 §4.1: the MX host, not the recipient domain).
        @param trust_root: anything L{load_trust_root} takes; L{None} is the
            platform's roots.  Pass the result of L{load_trust_root} to
            avoid reading a CA file per connection.
        @param mode: L{VerifyMode.VERIFY} to abort on failure,
            L{VerifyMode.RECORD_ONLY} to record it and go on.
        @param cache: take the TLS options (and their OpenSSL context) of
            this host from an L{MXTLSOptionsCache} rather than building
            them; C{trust_root} must then be L{None} (the cache's is used).
        @param dane: with L{VerifyMode.DANE} (and only then): the TLSA
            records and reference identifiers to authenticate the server
            by (RFC 7672 §3); a mismatch aborts the handshake.
        @param server_name: the SNI name when it is not C{hostname}: under
            DANE, the TLSA base domain (RFC 7672 §8.1).
        @raise ValueError: for an IP address literal, both C{trust_root}
            and C{cache}, or C{DANE} without C{dane} (or C{dane} without
            C{DANE}).
        """
        if isIPAddress(hostname) or isIPv6Address(hostname):
            # RFC 8461 §4.1 identifies the MX host by name.
            raise ValueError(f"MX host must be a DNS name, not {hostname!r}")
        if (mode is VerifyMode.DANE) != (dane is not None):
            raise ValueError("VerifyMode.DANE goes with a DANECheck, and only it")
        self.hostname = _ascii_hostname(hostname)
        self.mode = mode
        self.dane = dane
        self.server_name = _ascii_hostname(server_name) if server_name else self.hostname
        self.recorders: list[TLSOutcomeRecorder] = []
        if cache is not None:
            if trust_root is not None:
                raise ValueError("give trust_root or cache, not both")
            self._options = cache.options(self.hostname)
        else:
            self._options = MXTLSOptionsCache(trust_root, max_hosts=1).options(self.hostname)

    def __repr__(self) -> str:
        return f"<MXConnectionCreator {self.hostname} {self.mode.value}>"

    @property
    def recorder(self) -> TLSOutcomeRecorder | None:
        """The latest connection's recorder, or L{None} before any."""
        return self.recorders[-1] if self.recorders else None

    def outcome(self) -> TLSOutcome | None:
        """The latest connection's L{TLSOutcome}, or L{None} if TLS never started."""
        recorder = self.recorder
        return recorder.outcome() if recorder is not None else None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """
        Make the L{SSL.Connection} for one TLS client connection
        (L{IOpenSSLClientConnectionCreator}).

        @param tlsProtocol: the C{TLSMemoryBIOProtocol} of the connection.
        """
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        # SNI (RFC 6066 §3) = the MX host (RFC 8461 §4.1), or under DANE the
        # TLSA base domain (RFC 7672 §8.1).  Twisted 26.4+ sets the former
        # already; older Twisted set it from the info callback we replace.
        connection.set_tlsext_host_name(self.server_name.encode("ascii"))
        recorder = TLSOutcomeRecorder(self.hostname, self.mode, self.dane)
        recorder._attach(connection, tlsProtocol)
        self.recorders.append(recorder)
        return connection
