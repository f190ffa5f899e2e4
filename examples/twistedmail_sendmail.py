"""
Send one message with twisted.mail's own sender, under the recipients'
MTA-STS policies.

    python examples/twistedmail_sendmail.py [--nameserver IP[:PORT]]... [--ca-file PEM] \\
        [--port N] [--helo NAME] [--data-dir DIR] FROM TO... < message.eml

Reads the message (headers and body) from standard input, delivers it to
each recipient domain's MX hosts (MTA-STS: only hosts the policy lists,
STARTTLS with a verified certificate under ``enforce``), and prints one
line per recipient::

    bob@example.com delivered mx=mx.example.com tls=TLSv1.3 verified=yes
    carol@example.net deferred mx=mx.example.net tls=none verified=no (4.7.5 ...)

Exit status: 0 when every recipient got the message, 75 when any was
deferred (a policy or TLS failure, a temporary error: try again later;
this wins over 69, so the message is kept), 69 when any failed permanently,
64 on bad usage, 73 when the policy cache in --data-dir cannot be opened.

Only the twisted.mail hook is used: ``MTASTSContext`` (resolver, policy
cache in ``DIR/mtasts.sqlite``, refresher) and its drop-in for
``twisted.mail.smtp.sendmail``.
"""

import argparse
import sys

from twisted.internet import task
from twisted.internet.defer import ensureDeferred

from mtasts_twisted.delivery import DeliverySettings, Status
from mtasts_twisted.twistedmail import ContextError, ContextSettings, MTASTSContext

OK, USAGE, UNAVAILABLE, CANTCREAT, TEMPFAIL = 0, 64, 69, 73, 75
WORDS = {Status.DELIVERED: "delivered", Status.TRANSIENT: "deferred", Status.PERMANENT: "failed"}


async def main(reactor, args, message):
    settings = ContextSettings(
        data_dir=args.data_dir,
        nameservers=args.nameserver,
        ca_file=args.ca_file,
        delivery=DeliverySettings(helo_name=args.helo, port=args.port),
    )
    context = MTASTSContext(settings, reactor)
    context.startService()
    try:
        await context.when_ready()
        # twisted.mail's sendmail(host, from, to, msg) without the host;
        # deliver() gives each recipient's outcome (sendmail() the
        # (numOk, [(address, code, response)]) of twisted.mail).
        result = await context.deliver(args.sender, args.recipients, message)
    except ContextError as e:
        print(f"cannot start: {e}", file=sys.stderr)
        raise SystemExit(CANTCREAT)
    finally:
        await context.stopService()

    for outcome in result.outcomes:
        line = (f"{outcome.recipient} {WORDS[outcome.status]} mx={outcome.mx_host or '-'} "
                f"tls={outcome.tls_version or 'none'} verified={'yes' if outcome.verified else 'no'}")
        if outcome.status is not Status.DELIVERED:
            line += f" ({outcome.code or ''}{' ' if outcome.code else ''}{outcome.message})"
        print(line)
    statuses = {outcome.status for outcome in result.outcomes}
    if Status.TRANSIENT in statuses:
        raise SystemExit(TEMPFAIL)
    if Status.PERMANENT in statuses:
        raise SystemExit(UNAVAILABLE)
    raise SystemExit(OK)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(USAGE)


if __name__ == "__main__":
    parser = Parser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nameserver", action="append", default=[], metavar="IP[:PORT]")
    parser.add_argument("--ca-file", metavar="PEM", help="trust roots for MX and policy hosts")
    parser.add_argument("--port", type=int, default=25, help="TCP port of the MX hosts (25)")
    parser.add_argument("--helo", default="localhost", metavar="NAME", help="the EHLO name")
    parser.add_argument("--data-dir", default="mtasts-data", metavar="DIR", help="the policy cache's directory")
    parser.add_argument("sender", metavar="FROM")
    parser.add_argument("recipients", metavar="TO", nargs="+")
    args = parser.parse_args()
    task.react(lambda reactor: ensureDeferred(main(reactor, args, sys.stdin.buffer)))
