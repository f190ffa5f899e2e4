"""The project's own promises: README, CI and the command line agree."""

import io
import os
import re
import subprocess
import sys

from twisted.internet import reactor, utils
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mtasts_twisted import cli
from mtasts_twisted.testing.dns import DNSTestServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def quickstart_commands():
    """The commands of README's Quickstart section."""
    text = _read("README.rst")
    section = text.split("Quickstart\n==========\n", 1)[1].split("\n=", 1)[0]
    return re.findall(r"^    (python -m pip install .+)$", section, re.M)


class ReadmeTests(SynchronousTestCase):

    def test_two_commands(self):
        commands = quickstart_commands()
        self.assertEqual(len(commands), 2, commands)
        self.assertIn("twisted.trial", commands[1])

    def test_ci_runs_readme_test_command(self):
        """.ci/run extracts the README's test command with this pattern."""
        ci = _read(".ci/run")
        self.assertIn("grep -m1 -E \"^ +python -m pip install '\\.\\[test\\]' && \" README.rst", ci)
        test_command = quickstart_commands()[1]
        self.assertTrue(re.match(r"python -m pip install '\.\[test\]' && ", test_command))


    def test_lookup_options_listed(self):
        """README's synopsis of C{lookup} names every option the command takes."""
        text = _read("README.rst")
        synopsis = re.search(r"^``mtasts-twisted lookup [^\n]*``$", text, re.M).group(0)
        parser = cli.build_parser()
        lookup = parser._subparsers._group_actions[0].choices["lookup"]
        options = [o for action in lookup._actions for o in action.option_strings
                   if o.startswith("--") and o != "--help"]
        self.assertIn("--timeout", options)
        for option in options:
            self.assertIn(option, synopsis)


class FirstCommandTests(TestCase):
    timeout = 60

    async def test_first_command_runs(self):
        """
        The product part of README's command 1, C{twistd -n mtasts}, starts
        (on ephemeral loopback ports, asking a loopback DNS server), serves
        the socketmap, and stops on SIGTERM.
        """
        import signal

        from tests.test_service import socketmap_query
        from tests.test_twistd import STARTED, TWISTD, Twistd

        command = quickstart_commands()[0].split(" && ", 1)[1]
        tool, *args = command.split()
        self.assertEqual((tool, args), ("twistd", ["-n", "mtasts"]))
        server = DNSTestServer()
        server.start(reactor)
        self.addCleanup(server.stop)
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        proto = Twistd()
        process = reactor.spawnProcess(
            proto, sys.executable,
            [sys.executable, *TWISTD, "--pidfile=", *args, "--nameserver", server.nameserver,
             "--socketmap", "tcp:0:interface=127.0.0.1", "--smtp", "tcp:0:interface=127.0.0.1"],
            env=dict(os.environ), path=cwd)
        self.addCleanup(lambda: None if proto.ended.called else (process.signalProcess("KILL"), proto.ended)[1])
        port = int((await proto.wait_for(STARTED)).group(1))
        self.assertEqual(await socketmap_query(port, "example.com"), b"9:NOTFOUND ,")
        self.assertTrue(os.path.isfile(os.path.join(cwd, "mtasts-data", "mtasts.sqlite")))
        process.signalProcess("TERM")
        code, sig = await proto.ended
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], proto.output)
        self.assertNotIn(b"Traceback", proto.output)


class CheckPolicyTests(SynchronousTestCase):
    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(list(argv), out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def test_invalid(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("version: STSv1\nmode: enforce\nmax_age: 1\n")
        code, out, err = self.run_cli("check-policy", path)
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertIn("requires at least one mx", err)

    def test_json(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 99999999999\n")
        code, out, err = self.run_cli("check-policy", "--json", path)
        self.assertEqual(code, cli.EX_DATAERR)  # 11 digits
        self.assertIn('"valid": false', out)

    def test_missing_file(self):
        code, out, err = self.run_cli("check-policy", self.mktemp())
        self.assertEqual(code, cli.EX_NOINPUT)
        self.assertIn("cannot read", err)

    def test_usage_error(self):
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        exc = self.assertRaises(SystemExit, cli.main, ["no-such-command"])
        self.assertEqual(exc.code, cli.EX_USAGE)

    def test_no_command(self):
        code, out, err = self.run_cli()
        self.assertEqual(code, cli.EX_USAGE)
        self.assertIn("COMMAND", err)
