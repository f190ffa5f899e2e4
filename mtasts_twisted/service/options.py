"""
The options of C{twistd mtasts}: the command line, the TOML config file and
the defaults, checked and turned into one frozen L{ServiceSettings}.

L{Options} is what twistd parses (the plugin names this package); bad
options, an unreadable config file or an unwritable data directory are a
C{UsageError}.  Under twistd, L{Options.parseOptions} turns it into one
line on stderr and exit status 1 (twistd itself would print its whole usage
first); parsed by other code, the C{UsageError} is raised as usual.  After parsing, C{options.settings} is the
L{ServiceSettings} that L{mtasts_twisted.service.runtime} builds the
components from; the parsed values also stay readable as the option names
(C{options["data-dir"]}, C{options["report_settings"]}, ...) as twistd
options always are.
"""

from __future__ import annotations

import os
import socket
import tomllib
from typing import TYPE_CHECKING, Any

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.service.settings import DEFAULTS, LISTENERS, ServiceSettings, as_settings

if TYPE_CHECKING:
    from mtasts_twisted.tlsrpt import ReportSettings

__all__ = [
    "DEFAULTS",
    "LISTENERS",
    "MAX_SESSION_REUSE",
    "Options",
    "ServiceSettings",
    "as_settings",
]

#: The longest --session-reuse: RFC 5321 §4.5.3.2.7 lets a server drop an
#: idle client after 5 minutes.
MAX_SESSION_REUSE = 300.0

_FLAGS = ("no-reports", "report-unsigned", "strict-testing", "tlsrpt-attributes", "fail-open", "enforce-as-testing",
          "dane")
_OFF = ("", "none", "off")
_DATABASE_SCHEMES = ("sqlite:", "postgresql://", "postgres://", "memory:")


class _NoReactor:
    """Stands in for the reactor when only checking an endpoint's syntax."""


def _check_endpoint(name: str, description: str) -> None:
    try:
        serverFromString(_NoReactor(), description)
    except Exception as e:
        raise usage.UsageError(f"--{name} {description!r}: not a valid endpoint ({e})") from None


def _check_web(endpoint: str | None, password_file: str | None, token_file: str | None) -> None:
    """
    The status page binds loopback unless a password file or a token file
    guards it; each file given must be usable (L{read_password_file},
    L{read_token_file}).
    """
    if endpoint is None and password_file is None and token_file is None:
        return
    # The status page's modules (twisted.web.server, templates) load only
    # when it is configured: a socketmap-only process stays smaller.
    from mtasts_twisted.web import read_password_file, read_token_file, requires_auth

    if password_file is not None:
        try:
            read_password_file(password_file)
        except ValueError as e:
            raise usage.UsageError(f"--web-password-file {password_file}: {e}") from None
    if token_file is not None:
        try:
            read_token_file(token_file)
        except ValueError as e:
            raise usage.UsageError(f"--web-token-file {token_file}: {e}") from None
    if password_file is None and token_file is None and endpoint is not None and requires_auth(endpoint):
        raise usage.UsageError(f"--web {endpoint!r}: not a loopback address; give --web-password-file or "
                               "--web-token-file (or bind interface=127.0.0.1)")


def _check_writable_dir(path: str) -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise usage.UsageError(f"--data-dir {path}: not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise usage.UsageError(f"--data-dir {path}: not writable by uid {os.geteuid()}")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise usage.UsageError(f"--data-dir {path}: cannot be created ({parent} is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise usage.UsageError(f"--data-dir {path}: cannot be created ({parent} is not writable)")


def _check_queue_dir(data_dir: str) -> None:
    """The relay queue (DATA-DIR/queue), when it exists, must be a writable directory."""
    queue = os.path.join(data_dir, "queue")
    if os.path.exists(queue) and not os.path.isdir(queue):
        raise usage.UsageError(f"--data-dir {data_dir}: queue directory {queue} is not a directory")
    if os.path.exists(queue) and not os.access(queue, os.W_OK | os.X_OK):
        raise usage.UsageError(f"--data-dir {data_dir}: queue directory {queue} is not writable by uid {os.geteuid()}")


def _port_number(text: str, what: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise usage.UsageError(f"--delivery-port {what!r}: not a TCP port (1 to 65535)")
    return port


def _session_reuse(value: str) -> float:
    """Parse C{--session-reuse}: seconds from 0 to L{MAX_SESSION_REUSE}."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_SESSION_REUSE:  # also rejects nan
        raise usage.UsageError(f"--session-reuse {value!r}: expected seconds from 0 to {MAX_SESSION_REUSE:g}")
    return seconds


def _delivery_ports(values: list[str]) -> tuple[int, dict[str, int]]:
    """
    Parse the C{--delivery-port} values: C{PORT} (the last one wins) and
    C{HOST=PORT}; return C{(port, port_for)} for L{DeliverySettings}.
    """
    port = 25
    port_for: dict[str, int] = {}
    for value in values:
        host, sep, number = value.rpartition("=")
        if sep:
            host = host.strip().rstrip(".").lower()
            if not host:
                raise usage.UsageError(f"--delivery-port {value!r}: expected PORT or HOST=PORT")
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise usage.UsageError(f"--delivery-port {value!r}: not a host name") from None
            port_for[host] = _port_number(number, value)
        else:
            port = _port_number(number, value)
    return port, port_for


def _read_config(path: str) -> dict[str, Any]:
    """
    Read and check a C{--config} TOML file.

    @return: the settings by long option name (C{-} for C{_}).
    @raise usage.UsageError: one line saying what is wrong.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"--config {path}: not valid TOML: {e}") from None
    known = set(DEFAULTS) | set(_FLAGS) | {"nameserver"}
    settings = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in known:
            raise usage.UsageError(f"--config {path}: unknown setting {key!r}")
        if name in _FLAGS:
            if not isinstance(value, bool):
                raise usage.UsageError(f"--config {path}: {key} must be true or false")
        elif name == "nameserver":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise usage.UsageError(f"--config {path}: nameserver must be a string or a list of strings")
        elif name == "delivery-port":
            value = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
            if not isinstance(value, list) or not all(
                    isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)) for v in value):
                raise usage.UsageError(f"--config {path}: delivery-port must be a port, HOST=PORT or a list")
            value = [str(v) for v in value]
        elif name == "session-reuse":
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise usage.UsageError(f"--config {path}: session-reuse must be a number of seconds")
            value = str(value)
        elif not isinstance(value, str):
            raise usage.UsageError(f"--config {path}: {key} must be a string")
        settings[name] = value
    return settings


def _check_overrides(path: str) -> None:
    """A malformed overrides file stops startup with its one line (C{FILE:LINE: what})."""
    from mtasts_twisted.overrides import OverrideFileError, load_overrides

    try:
        load_overrides(path)
    except OverrideFileError as e:
        raise usage.UsageError(str(e)) from None


class Options(usage.Options):
    """
    The options of C{twistd mtasts}.  C{--config FILE} reads the same
    settings from TOML (keys are the long option names); options given on
    the command line win.

    After parsing, L{settings} holds the L{ServiceSettings}; as keys,
    C{self["report_settings"]} is a L{ReportSettings} or L{None} (reports
    off), C{self["database"]} the database URL and the listener options are
    L{None} when off.

    @ivar settings: the L{ServiceSettings}, once parsed.
    """

    settings: ServiceSettings

    synopsis = "[options]"
    longdesc = (
        "MTA-STS (RFC 8461) and TLSRPT (RFC 8460): a Postfix socketmap policy server, "
        "a local relay, daily TLSRPT reports and Prometheus metrics. Every listener "
        "binds 127.0.0.1 unless told otherwise; 'none' turns a listener off."
    )
    optParameters = [
        ["config", "c", None, "TOML file with any of these settings (options given here win)"],
        ["data-dir", "d", None, f"state directory [default: {DEFAULTS['data-dir']}]"],
        ["database", None, None, "database URL: sqlite:PATH or postgresql://... "
                                 "[default: sqlite:DATA-DIR/mtasts.sqlite]"],
        ["smtp", None, None, f"relay SMTP intake endpoint [default: {DEFAULTS['smtp']}]"],
        ["socketmap", None, None, f"Postfix socketmap endpoint [default: {DEFAULTS['socketmap']}]"],
        ["metrics", None, None, "Prometheus metrics endpoint, e.g. tcp:9461:interface=127.0.0.1 "
                                "[default: none]"],
        ["web", None, None, "read-only status page endpoint, e.g. tcp:8080:interface=127.0.0.1; any "
                            "address but loopback needs --web-password-file or --web-token-file [default: none]"],
        ["web-password-file", None, None, "USER:PASSWORD lines: the status page asks for one (HTTP basic auth)"],
        ["web-token-file", None, None, "tokens, one a line (>= 16 characters, file mode 600): the status page "
                                       "accepts 'Authorization: Bearer TOKEN'"],
        ["ca-file", None, None, "PEM CA certificates to trust instead of the system's"],
        ["report-org", None, None, "TLSRPT organization-name"],
        ["report-from", None, None, "From address of mailed TLSRPT reports"],
        ["report-contact", None, None, "TLSRPT contact-info [default: --report-from]"],
        ["report-submitter", None, None, "TLSRPT submitter domain [default: --report-from's domain]"],
        ["report-dkim-key", None, None, "PEM private key to DKIM-sign mailed reports"],
        ["report-dkim-selector", None, None, "DKIM selector of --report-dkim-key"],
        ["helo-name", None, None, "name sent in EHLO [default: this host's FQDN]"],
        ["session-reuse", None, None, "seconds an outbound SMTP session stays open for the next message "
         f"to the same domain and MX, 0 for never [default: {DEFAULTS['session-reuse']}]"],
        ["policy-overrides", None, None, "TOML file of per-domain policy overrides (enforce, skip, dane-only); "
                                         "reloaded on SIGHUP"],
        ["smtp-tls-cert", None, None, "PEM certificate (and chain) for STARTTLS on --smtp; needed for "
                                      "REQUIRETLS (RFC 8689) [default: no STARTTLS]"],
        ["smtp-tls-key", None, None, "PEM private key of --smtp-tls-cert"],
    ]
    optFlags = [
        ["no-reports", None, "send no TLSRPT reports (and collect no results)"],
        ["report-unsigned", None, "mail TLSRPT reports without a DKIM signature when no --report-dkim-key "
                                  "is given (RFC 8460 §3 requires one; without this, mailto: rua are skipped)"],
        ["strict-testing", None, "socketmap: answer testing policies like enforce"],
        ["tlsrpt-attributes", None, "socketmap: add Postfix >= 3.10 TLSRPT attributes"],
        ["fail-open", None, "socketmap: answer NOTFOUND instead of TEMP when no policy can be found"],
        ["enforce-as-testing", None, "EMERGENCY: apply every enforce policy as testing (deliver and report)"],
        ["dane", None, "relay: DANE (RFC 7672) before MTA-STS for MX hosts with DNSSEC-secure TLSA records "
                       "(needs a validating resolver on loopback as --nameserver)"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["nameserver"] = []
        self["delivery-port"] = []

    def opt_delivery_port(self, value: str) -> None:
        """TCP port of MX hosts [default: 25], for tests and lab setups; HOST=PORT (repeatable) sets one MX host's port"""
        self["delivery-port"].append(value)

    def opt_nameserver(self, value: str) -> None:
        """DNS server IP[:PORT] for every lookup (repeatable) [default: /etc/resolv.conf]"""
        self["nameserver"].append(value)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse C{options}.  As a twistd subcommand (when twistd's options are
        the C{parent}), a usage error ends the process with one line on
        stderr and exit status 1, instead of twistd's printing its whole
        usage on stdout before it.

        @raise usage.UsageError: what is wrong, in one line (not under twistd).
        @raise SystemExit: with C{"twistd mtasts: <what is wrong>"} (under twistd).
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit("twistd mtasts: " + " ".join(str(e).split())) from None

    def postOptions(self) -> None:
        """Merge the config file and the defaults; check everything."""
        config = _read_config(self["config"]) if self["config"] else {}
        for name, default in DEFAULTS.items():
            if name == "delivery-port":
                continue
            if self[name] is None:
                self[name] = config.get(name, default)
        for name in _FLAGS:
            self[name] = bool(self[name] or config.get(name, False))
        if not self["nameserver"]:
            self["nameserver"] = list(config.get("nameserver", []))
        if not self["delivery-port"]:
            self["delivery-port"] = list(config.get("delivery-port", [DEFAULTS["delivery-port"]]))
        self["delivery_ports"] = _delivery_ports(self["delivery-port"])

        _check_writable_dir(self["data-dir"])
        if self["database"] is None:
            from mtasts_twisted.store import default_database_url

            self["database"] = default_database_url(self["data-dir"])
        elif not self["database"].startswith(_DATABASE_SCHEMES):
            raise usage.UsageError(
                f"--database {self['database']!r}: expected sqlite:PATH or postgresql://USER@HOST/DB")
        for name in LISTENERS:
            if self[name].strip().lower() in _OFF:
                self[name] = None
            else:
                _check_endpoint(name, self[name])
        if self["smtp"] is not None:
            _check_queue_dir(self["data-dir"])
        if (self["smtp-tls-cert"] is None) != (self["smtp-tls-key"] is None):
            raise usage.UsageError("--smtp-tls-cert and --smtp-tls-key go together")
        if self["smtp-tls-cert"] is not None:
            from mtasts_twisted.service.intaketls import load_smtp_tls

            load_smtp_tls(self["smtp-tls-cert"], self["smtp-tls-key"])
        _check_web(self["web"], self["web-password-file"], self["web-token-file"])

        from mtasts_twisted.dns import parse_nameserver

        for server in self["nameserver"]:
            try:
                parse_nameserver(server)
            except ValueError as e:
                raise usage.UsageError(f"--nameserver: {e}") from None
        if self["ca-file"] is not None:
            from mtasts_twisted.fetch import load_trust_roots

            try:
                load_trust_roots(self["ca-file"])
            except OSError as e:
                raise usage.UsageError(f"--ca-file {self['ca-file']}: cannot read it: {e.strerror}") from None
            except ValueError as e:
                raise usage.UsageError(f"--ca-file {self['ca-file']}: {e}") from None
        if not self["helo-name"]:
            self["helo-name"] = socket.getfqdn()
        self["session_reuse"] = _session_reuse(self["session-reuse"])
        if self["policy-overrides"] is not None:
            _check_overrides(self["policy-overrides"])
        self["report_settings"] = self._report_settings()
        self.settings = ServiceSettings.from_config(self)

    def _report_settings(self) -> ReportSettings | None:
        if self["no-reports"]:
            return None
        org, sender = self["report-org"], self["report-from"]
        if not org and not sender:
            return None
        if not org or not sender:
            raise usage.UsageError("--report-org and --report-from go together (or give --no-reports)")
        from mtasts_twisted.tlsrpt import ReportSettings

        submitter = self["report-submitter"] or sender.rpartition("@")[2]
        if self["report-dkim-key"] is not None:
            from mtasts_twisted.tlsrpt.mail import load_dkim_key

            try:
                load_dkim_key(self["report-dkim-key"])
            except OSError as e:
                raise usage.UsageError(
                    f"--report-dkim-key {self['report-dkim-key']}: cannot read it: {e.strerror}") from None
            except ValueError:
                raise usage.UsageError(
                    f"--report-dkim-key {self['report-dkim-key']}: no PEM private key in it") from None
        try:
            return ReportSettings(
                organization=org,
                submitter_domain=submitter,
                contact=self["report-contact"] or sender,
                from_address=sender,
                dkim_key_file=self["report-dkim-key"],
                dkim_selector=self["report-dkim-selector"],
            )
        except (ValueError, MTASTSError) as e:
            raise usage.UsageError(f"report settings: {e}") from None
