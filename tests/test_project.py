"""The project's own promises: README, CI and the command line agree."""

import io
import os
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


class ReadmeTests(SynchronousTestCase):
    def quickstart_commands(self):
        text = _read("README.rst")
        section = text.split("Quickstart\n==========\n", 1)[1].split("\n=", 1)[0]
        return re.findall(r"^    (python -m pip install .+)$", section, re.M)

    def test_two_commands(self):
        commands = self.quickstart_commands()
        self.assertEqual(len(commands), 2, commands)
        self.assertIn("twisted.trial", commands[1])

    def test_ci_runs_readme_test_command(self):
        """.ci/run extracts the README's test command with this pattern."""
        ci = _read(".ci/run")
        self.assertIn("grep -m1 -E \"^ +python -m pip install '\\.\\[test\\]' && \" README.rst", ci)
        test_command = self.quickstart_commands()[1]
        self.assertTrue(re.match(r"python -m pip install '\.\[test\]' && ", test_command))

    def test_first_command_runs(self):
        """The product part of command 1 works on the installed package."""
        command = self.quickstart_commands()[0].split(" && ", 1)[1]
        policy_text, _, tool = command.partition(" | ")
        self.assertTrue(tool.startswith("mtasts-twisted "), tool)
        data = subprocess.run(policy_text, shell=True, capture_output=True, check=True).stdout
        args = tool.split()[1:]
        result = subprocess.run(
            [sys.executable, "-m", "mtasts_twisted", *args], input=data, capture_output=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"valid policy: mode enforce", result.stdout)


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
        self.assertEqual(code, cli.EX_USAGE)
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
