"""
The C{twistd mtasts} service: a thin twistd face over tested modules.

C{twisted/plugins/mtasts_plugin.py} only names this package, which holds
L{Options} and L{makeService} as twistd wants them:

  - L{options<mtasts_twisted.service.options>}: the twistd L{Options}, the
    TOML config file and option checks, ending in a frozen
    L{ServiceSettings};
  - L{settings<mtasts_twisted.service.settings>}: L{ServiceSettings} itself
    and the options' defaults;
  - L{runtime<mtasts_twisted.service.runtime>}: the composition root,
    L{open_runtime}, building every component from the settings (also used
    by the CLI's C{report} commands);
  - L{reportmail<mtasts_twisted.service.reportmail>}: the mailer of TLSRPT
    reports (L{ReportMailer}, L{NoPolicyCache});
  - L{listeners<mtasts_twisted.service.listeners>}: the endpoints, bound
    while privileged, serving once the service is ready;
  - L{fdlimits<mtasts_twisted.service.fdlimits>}: the file descriptor
    limit raised at start, and the listeners' connection caps sized under it;
  - L{tap<mtasts_twisted.service.tap>}: L{MTASTSService} and
    L{makeService}.

A failure at start (a port in use, a database that cannot be opened) is
logged as one line and the process exits with status 1; bad options are
a C{UsageError} from L{Options.postOptions}, which twistd prints with
exit status 1.

Reports need C{--report-org} and C{--report-from}.  Without them (and
without C{--no-reports}) the service runs without TLSRPT: results are not
collected, nothing is sent, and a warning says so at start.
"""

from mtasts_twisted.service.listeners import ListenerService
from mtasts_twisted.service.options import MAX_SESSION_REUSE, Options
from mtasts_twisted.service.settings import DEFAULTS, ServiceSettings
from mtasts_twisted.service.reportmail import NoPolicyCache, ReportMailError, ReportMailer
from mtasts_twisted.service.runtime import (
    IServiceReactor,
    MeteredReportScheduler,
    Runtime,
    StartupError,
    open_runtime,
)
from mtasts_twisted.service.tap import MTASTSService, makeService, queue_directory

__all__ = [
    "DEFAULTS",
    "MAX_SESSION_REUSE",
    "IServiceReactor",
    "ListenerService",
    "MTASTSService",
    "MeteredReportScheduler",
    "NoPolicyCache",
    "Options",
    "ReportMailError",
    "ReportMailer",
    "Runtime",
    "ServiceSettings",
    "StartupError",
    "makeService",
    "open_runtime",
    "queue_directory",
]
