"""
The frozen settings of C{twistd mtasts}: L{ServiceSettings}, made from the
parsed options (L{mtasts_twisted.service.options.Options}) or a mapping with
their keys (L{as_settings}), and the defaults of the options
(L{DEFAULTS}).  The composition root
(L{mtasts_twisted.service.runtime}) builds every component from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from mtasts_twisted.tlsrpt import ReportSettings

__all__ = ["DEFAULTS", "LISTENERS", "ServiceSettings", "as_settings"]

#: The listener options, in the order the service binds them.
LISTENERS = ("smtp", "socketmap", "metrics", "web")

#: The defaults of the parameters (C{None}: off or computed).
DEFAULTS: dict[str, Any] = {
    "data-dir": "./mtasts-data",
    "database": None,  # sqlite:<data-dir>/mtasts.sqlite
    "smtp": "tcp:2525:interface=127.0.0.1",
    "socketmap": "tcp:8461:interface=127.0.0.1",
    "metrics": "none",
    "web": "none",
    "web-password-file": None,
    "web-token-file": None,
    "ca-file": None,
    "report-org": None,
    "report-from": None,
    "report-contact": None,
    "report-submitter": None,
    "report-dkim-key": None,
    "report-dkim-selector": None,
    "helo-name": None,  # socket.getfqdn()
    "delivery-port": "25",
    "session-reuse": "2",
    "policy-overrides": None,
    "smtp-tls-cert": None,
    "smtp-tls-key": None,
}


def _read_only(ports: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(ports))


@attrs.frozen
class ServiceSettings:
    """
    Everything C{twistd mtasts} was told, checked: what L{Options} makes of
    the command line, the config file and the defaults.

    @ivar data_dir: the state directory (C{--data-dir}).
    @ivar database: the database URL (C{--database}, or SQLite in
        C{data_dir}).
    @ivar smtp: the relay intake's endpoint, or L{None} when off.
    @ivar socketmap: the socketmap server's endpoint, or L{None} when off.
    @ivar metrics: the metrics page's endpoint, or L{None} when off.
    @ivar web: the status page's endpoint, or L{None} when off.
    @ivar web_password_file: C{USER:PASSWORD} lines the status page asks
        for (HTTP basic authentication), or L{None}.
    @ivar web_token_file: bearer tokens (one a line) the status page
        accepts (C{Authorization: Bearer}), or L{None}.  Without either
        file C{web} is loopback only.
    @ivar nameservers: C{IP[:PORT]} of the DNS servers; empty for
        C{/etc/resolv.conf}.
    @ivar ca_file: PEM CA certificates trusted instead of the system's, or
        L{None}.
    @ivar report_settings: the L{ReportSettings}, or L{None} when reports
        are off.
    @ivar no_reports: C{--no-reports} was given (reports off on purpose,
        so no warning).
    @ivar report_unsigned: C{--report-unsigned}: mail reports without a
        DKIM signature when no key is configured (RFC 8460 §3 says they MUST
        be signed; see L{mail_reports}).
    @ivar helo_name: the EHLO name and DSN reporting MTA.
    @ivar delivery_port: the TCP port of MX hosts.
    @ivar delivery_port_for: ports of single MX hosts (C{HOST=PORT}), by
        lower-case A-label host name.
    @ivar session_reuse: seconds an outbound session stays open for reuse.
    @ivar strict_testing: socketmap: answer C{testing} like C{enforce}.
    @ivar tlsrpt_attributes: socketmap: add the Postfix >= 3.10 TLSRPT
        attributes.
    @ivar fail_open: socketmap: C{NOTFOUND} instead of C{TEMP} when no
        policy can be found.
    @ivar policy_overrides: the operator's overrides file
        (L{mtasts_twisted.overrides}), or L{None}.
    @ivar enforce_as_testing: apply every C{enforce} policy as C{testing}
        (the emergency switch).
    @ivar smtp_tls_cert: PEM certificate (and chain) the relay intake
        offers STARTTLS with, or L{None} (no STARTTLS, so no REQUIRETLS:
        RFC 8689 §2).
    @ivar smtp_tls_key: the PEM private key of C{smtp_tls_cert}.
    @ivar dane: C{--dane}: the relay delivers with DANE (RFC 7672) for
        hosts of DNSSEC-secure MX RRsets (C{DeliverySettings.dane}).
    """

    data_dir: str
    database: str
    helo_name: str
    smtp: str | None = None
    socketmap: str | None = None
    metrics: str | None = None
    web: str | None = None
    web_password_file: str | None = None
    web_token_file: str | None = None
    nameservers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    ca_file: str | None = None
    report_settings: ReportSettings | None = None
    no_reports: bool = False
    report_unsigned: bool = False
    delivery_port: int = 25
    delivery_port_for: Mapping[str, int] = attrs.field(factory=dict, converter=_read_only, hash=False)
    session_reuse: float = float(DEFAULTS["session-reuse"])
    strict_testing: bool = False
    tlsrpt_attributes: bool = False
    fail_open: bool = False
    policy_overrides: str | None = None
    enforce_as_testing: bool = False
    smtp_tls_cert: str | None = None
    smtp_tls_key: str | None = None
    dane: bool = False

    @property
    def listeners(self) -> dict[str, str]:
        """The endpoints of the listeners that are on, by option name, in L{LISTENERS} order."""
        endpoints = {"smtp": self.smtp, "socketmap": self.socketmap, "metrics": self.metrics, "web": self.web}
        return {name: endpoint for name in LISTENERS if (endpoint := endpoints[name]) is not None}

    @property
    def mail_reports(self) -> bool:
        """
        Whether reports go to C{mailto:} rua.  RFC 8460 §3: "Reports sent
        via SMTP MUST contain a valid DKIM signature", so only with a DKIM
        key and selector, or when the operator says C{--report-unsigned};
        otherwise C{mailto:} rua are skipped (and C{https:} ones still
        served).
        """
        settings = self.report_settings
        if settings is None:
            return False
        return settings.dkim_key_file is not None or self.report_unsigned

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ServiceSettings:
        """
        The settings of parsed options.

        @param config: parsed L{Options}, or a mapping with the same keys
            (the keys L{open_runtime<mtasts_twisted.service.open_runtime>}
            needs at least: C{database}, C{nameserver}, C{ca-file},
            C{report_settings}, C{helo-name}).
        """
        port, port_for = config.get("delivery_ports") or (25, {})
        return cls(
            data_dir=config.get("data-dir", DEFAULTS["data-dir"]),
            database=config["database"],
            helo_name=config["helo-name"],
            smtp=config.get("smtp"),
            socketmap=config.get("socketmap"),
            metrics=config.get("metrics"),
            web=config.get("web"),
            web_password_file=config.get("web-password-file"),
            web_token_file=config.get("web-token-file"),
            nameservers=config["nameserver"] or (),
            ca_file=config["ca-file"],
            report_settings=config["report_settings"],
            no_reports=bool(config.get("no-reports", False)),
            report_unsigned=bool(config.get("report-unsigned", False)),
            delivery_port=port,
            delivery_port_for=port_for,
            session_reuse=config.get("session_reuse", float(DEFAULTS["session-reuse"])),
            strict_testing=bool(config.get("strict-testing", False)),
            tlsrpt_attributes=bool(config.get("tlsrpt-attributes", False)),
            fail_open=bool(config.get("fail-open", False)),
            policy_overrides=config.get("policy-overrides"),
            enforce_as_testing=bool(config.get("enforce-as-testing", False)),
            smtp_tls_cert=config.get("smtp-tls-cert"),
            smtp_tls_key=config.get("smtp-tls-key"),
            dane=bool(config.get("dane", False)),
        )


def as_settings(config: ServiceSettings | Mapping[str, Any]) -> ServiceSettings:
    """
    The L{ServiceSettings} of C{config}.

    @param config: L{ServiceSettings}, parsed L{Options} (their
        C{settings}), or a mapping with the keys of parsed options.
    """
    if isinstance(config, ServiceSettings):
        return config
    settings = getattr(config, "settings", None)
    if isinstance(settings, ServiceSettings):
        return settings
    return ServiceSettings.from_config(config)
