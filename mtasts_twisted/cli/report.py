"""
C{mtasts-twisted report preview|send}: the TLSRPT reports (RFC 8460) of
the service, previewed or sent now, with the service's own configuration.

C{preview} only reads the database, so it needs no report settings; the
results of the last minute may not be there yet: the running service's
aggregator writes them every 60 seconds (and when it stops).
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import TYPE_CHECKING, TextIO

from mtasts_twisted.cli.common import EX_CANTCREAT, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE, missing_database

if TYPE_CHECKING:
    from mtasts_twisted.cli.common import Reactor
    from mtasts_twisted.service import Options

__all__ = ["run_report"]


def _service_options(args: argparse.Namespace) -> Options:
    """The twistd options (and config file) the report commands share with the service."""
    from mtasts_twisted.service import Options

    argv: list[str] = []
    for name in ("config", "data_dir", "database", "ca_file", "report_org", "report_from", "report_dkim_key",
                 "report_dkim_selector"):
        value = getattr(args, name, None)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), value]
    if getattr(args, "report_unsigned", False):
        argv.append("--report-unsigned")
    for server in args.nameserver or ():
        argv += ["--nameserver", server]
    argv += ["--smtp", "none", "--socketmap", "none", "--metrics", "none"]
    options = Options()
    options.parseOptions(argv)
    return options


async def run_report(reactor: Reactor, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    C{mtasts-twisted report preview [--day D] [--domain D]} lists the
    pending TLSRPT reports, or with both shows one report's JSON;
    C{report send --now} sends every due report now.
    """
    from twisted.python import usage

    from mtasts_twisted.service import StartupError, open_runtime
    from mtasts_twisted.tlsrpt import NoResultsError, ReportScheduler, ReportSettings

    # The metadata of a report previewed without --report-org and --report-from.
    unconfigured = ReportSettings(organization="(no --report-org given)", submitter_domain="invalid",
                                   contact="tlsrpt@invalid", from_address="tlsrpt@invalid")

    if args.day is not None:
        try:
            datetime.date.fromisoformat(args.day)
        except ValueError:
            err.write(f"mtasts-twisted report: --day {args.day!r}: not YYYY-MM-DD\n")
            return EX_USAGE
    try:
        config = _service_options(args)
    except usage.UsageError as e:
        err.write(f"mtasts-twisted report: {e}\n")
        return EX_USAGE
    if config["report_settings"] is None and args.action == "send":
        err.write("mtasts-twisted report: reports are not configured: give --report-org and"
                  " --report-from (or --config with them)\n")
        return EX_USAGE
    if missing_database(config["database"], "report", err):
        return EX_NOINPUT
    try:
        runtime = await open_runtime(config, reactor)
    except StartupError as e:
        err.write(f"mtasts-twisted report: {e}\n")
        return EX_CANTCREAT
    try:
        scheduler = runtime.scheduler
        if scheduler is None:
            # Previewing without report settings: only the report's metadata
            # (organization, contact) is unknown, and says so.
            scheduler = ReportScheduler(runtime.store, unconfigured, runtime.resolver, reactor)
        if args.action == "send":
            outcomes = await scheduler.send_now()
            for outcome in outcomes:
                out.write(f"{outcome.day} {outcome.policy_domain}: {outcome.state.value}"
                          f"{' to ' + ', '.join(outcome.delivered_to) if outcome.delivered_to else ''}"
                          f"{' (' + '; '.join(outcome.errors) + ')' if outcome.errors else ''}\n")
            if not outcomes:
                out.write("no reports due\n")
            return EX_OK if all(o.state.value in ("sent", "dropped", "skipped") for o in outcomes) \
                else EX_TEMPFAIL
        if args.day is not None and args.domain is not None:
            try:
                report = await scheduler.preview(args.day, args.domain)
            except NoResultsError as e:
                err.write(f"{e}\n")
                return EX_NOINPUT
            out.write(json.dumps(report, indent=2) + "\n")
            return EX_OK
        pending = await scheduler.pending(args.day, args.domain)
        for p in pending:
            fields = [p.day, p.policy_domain, p.state]
            if p.attempts:
                fields.append(f"attempts {p.attempts}")
            if p.last_error:
                fields.append(p.last_error)
            out.write("\t".join(fields) + "\n")
        if not pending:
            out.write("no pending reports\n")
        return EX_OK
    finally:
        await runtime.close()
