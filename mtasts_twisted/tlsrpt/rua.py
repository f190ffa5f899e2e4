"""
Delivering one report to its policy domain's C{rua} endpoints (RFC 8460
§3, §5): L{RuaSender.send} looks up C{_smtp._tls.<domain>}, POSTs to every
C{https:} rua (an L{HTTPSReportSender
<mtasts_twisted.tlsrpt.https.HTTPSReportSender>}, or anything with its
L{ReportPoster} C{send}) and mails every C{mailto:} rua (the injected
L{SendMail<mtasts_twisted.tlsrpt.mail.SendMail>}), DKIM-signed when a key
is configured, and says what became of the attempt (L{RuaOutcome}).

It keeps no state: claims, leases, retries and the sends shelf are
L{ReportScheduler<mtasts_twisted.tlsrpt.schedule.ReportScheduler>}'s.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mtasts_twisted.dns import DNSNoRecordError, DNSTemporaryError
from mtasts_twisted.dns.records import lookup_tlsrpt_record
from mtasts_twisted.interfaces import IDNSResolver
from mtasts_twisted.policy import MTASTSError
from mtasts_twisted.tlsrpt.https import ReportDeliveryError
from mtasts_twisted.tlsrpt.mail import SendMail, build_report_message, load_dkim_key, mailto_addresses
from mtasts_twisted.tlsrpt.report import Report, ReportSettings
from mtasts_twisted.tlsrpt.sends import SendState

__all__ = ["ReportPoster", "RuaOutcome", "RuaSender"]

# The scheduler's namespace, as before the split into modules.
log = Logger(namespace="mtasts_twisted.tlsrpt.schedule")


class ReportPoster(Protocol):
    """What the scheduler needs of L{HTTPSReportSender}."""

    def send(self, uri: str, report: Report) -> Deferred[int]:
        """POST C{report} to C{uri}; fail with L{ReportDeliveryError}."""


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class RuaOutcome:
    """
    What one attempt to deliver a report did.

    @ivar state: L{SendState.SENT} (an endpoint accepted it, RFC 8460 §3),
        L{SendState.DROPPED} (no usable TLSRPT record or rua: final), or
        L{None} (nothing accepted it yet: retry).
    @ivar delivered: the rua URIs (per address for C{mailto:}) that
        accepted it.
    @ivar errors: what failed, one text per endpoint or lookup.
    """

    state: SendState | None
    delivered: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    errors: tuple[str, ...] = attrs.field(default=(), converter=_strings)


class RuaSender:
    """
    Delivers a report to every usable rua of its policy domain.
    """

    def __init__(
        self,
        settings: ReportSettings,
        resolver: IDNSResolver,
        clock: IReactorTime,
        rng: random.Random,
        https_sender: ReportPoster | None = None,
        send_mail: SendMail | None = None,
    ) -> None:
        """
        @param settings: the report metadata and the DKIM key and selector.
        @param resolver: looks up C{_smtp._tls} TXT records.
        @param clock: dates the mailed reports.
        @param rng: makes the Message-IDs unique.
        @param https_sender: delivers to C{https:} rua; without one they
            are skipped.
        @param send_mail: delivers a mailed report; without one C{mailto:}
            rua are skipped.
        @raise OSError, ValueError: the DKIM key file cannot be read.
        """
        self.settings = settings
        self._resolver = resolver
        self._clock = clock
        self._rng = rng
        self._https = https_sender
        self._send_mail = send_mail
        self._dkim_key: bytes | None = None
        if settings.dkim_key_file is not None:
            self._dkim_key = load_dkim_key(settings.dkim_key_file)

    async def send(self, report: Report, attempt: int) -> RuaOutcome:
        """
        Deliver C{report} to the rua of its policy domain.

        @param attempt: which attempt this is (1 for the first), for the
            mailed report's Message-ID.
        """
        domain = report.policy_domain
        delivered: list[str] = []
        errors: list[str] = []
        state: SendState | None = None
        try:
            # RFC 8460 §3: not exactly one record: "assume the recipient
            # domain does not implement TLSRPT" (dropped below).
            record = await lookup_tlsrpt_record(self._resolver, domain)
        except DNSNoRecordError as e:
            errors.append(f"no TLSRPT record: {e}")
            state = SendState.DROPPED
        except DNSTemporaryError as e:
            errors.append(f"TLSRPT record lookup failed: {e}")
        except MTASTSError as e:
            errors.append(f"no usable TLSRPT record: {e}")
            state = SendState.DROPPED
        else:
            usable = 0
            for uri in record.rua:
                scheme = uri.partition(":")[0].lower()
                if scheme == "https" and self._https is not None:
                    usable += 1
                    await self._deliver_https(uri, report, delivered, errors)
                elif scheme == "mailto" and self._send_mail is not None:
                    usable += 1
                    await self._deliver_mail(uri, report, attempt, delivered, errors)
                else:
                    log.info("TLSRPT: ignoring rua {uri} of {domain}", uri=uri, domain=domain)
            if delivered:
                # RFC 8460 §3: delivered once "one of the endpoints accepts".
                state = SendState.SENT
            elif not usable:
                errors.append("no usable rua: " + ", ".join(record.rua))
                state = SendState.DROPPED
        return RuaOutcome(state, delivered, errors)

    async def _deliver_https(
        self, uri: str, report: Report, delivered: list[str], errors: list[str]
    ) -> None:
        assert self._https is not None
        try:
            await self._https.send(uri, report)
        except Exception as e:
            errors.append(str(e))
        else:
            delivered.append(uri)

    async def _deliver_mail(
        self, uri: str, report: Report, attempt: int, delivered: list[str],
        errors: list[str],
    ) -> None:
        assert self._send_mail is not None
        try:
            addresses = mailto_addresses(uri)
        except ValueError as e:
            errors.append(str(e))
            return
        if self._dkim_key is None:
            # RFC 8460 §3: unsigned reports "MUST be ignored by the recipient".
            log.warn("TLSRPT: mailing report {report_id} without a DKIM signature",
                     report_id=report.report_id)
        for address in addresses:
            message = build_report_message(
                report,
                self.settings,
                address,
                now=self._clock.seconds(),
                message_id=f"{report.unique}.{attempt}.{self._rng.getrandbits(32):08x}"
                f"@{report.submitter}",
                dkim_key=self._dkim_key,
            )
            try:
                await self._send_mail(self.settings.from_address, address, message)
            except Exception as e:
                errors.append(str(ReportDeliveryError(f"mailto:{address}", str(e), "mail-failed")))
            else:
                delivered.append(f"mailto:{address}")
