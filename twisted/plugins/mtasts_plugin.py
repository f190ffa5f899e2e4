"""
The C{twistd mtasts} plugin: a lazy L{ServiceMaker}.

Nothing is imported from C{mtasts_twisted} until twistd runs C{mtasts}
(the package L{mtasts_twisted.service} holds the options and the service).
"""

from twisted.application.service import ServiceMaker

mtasts = ServiceMaker(
    "mtasts",
    "mtasts_twisted.service",
    "MTA-STS (RFC 8461) and TLSRPT (RFC 8460): Postfix socketmap policy server, relay, reports, metrics",
    "mtasts",
)
