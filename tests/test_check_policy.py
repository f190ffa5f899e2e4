"""
C{mtasts-twisted check-policy} and L{mtasts_twisted.policy.policy_errors}:
every error of a policy file, not just the first.
"""

from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted import cli
from mtasts_twisted.policy import PolicySyntaxError, parse_policy, policy_errors

#: Four errors: a bad mode (line 2), a line that is no field (line 3), a bad
#: mx (line 4), and no max_age at all.
BROKEN = "version: STSv1\nmode: bogus\nthis is not a field\nmx: exa_mple..com\n"

#: Texts parse_policy rejects, each with the first error it raises.
REJECTED = [
    "",
    "\n\n",
    "version: STSv1\r\rmode: enforce\n",
    BROKEN,
    "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 12345678901\n",
    "version: STSv1\nmode:\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: enforce\nmode: x\x01y\nmx: a.example\nmax_age: 1\n",
    "version: STSv1\nmode: none\nmax_age: 1\next: a\x01b\n",
    b"version: STSv1\nmode: \xff\n",
    "x" * 70000,
]


class PolicyErrorsTests(SynchronousTestCase):
    def test_every_error(self) -> None:
        errors = policy_errors(BROKEN)
        self.assertEqual([number for number, _ in errors], [2, 3, 4, None])
        self.assertIn("mode 'bogus'", str(errors[0][1]))
        self.assertIn("line 3: expected 'name: value'", str(errors[1][1]))
        self.assertIn("mx 'exa_mple..com'", str(errors[2][1]))
        self.assertEqual(str(errors[3][1]), "missing required field 'max_age'")
        self.assertTrue(all(isinstance(e, PolicySyntaxError) for _, e in errors))

    def test_first_is_what_parse_policy_raises(self) -> None:
        """parse_policy's behaviour is unchanged: it raises the first of the errors."""
        for text in REJECTED:
            raised = self.assertRaises(PolicySyntaxError, parse_policy, text)
            errors = policy_errors(text)
            self.assertTrue(errors, text)
            self.assertEqual((str(errors[0][1]), errors[0][1].reason), (str(raised), raised.reason), text)

    def test_valid_has_none(self) -> None:
        self.assertEqual(policy_errors("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 86400\n"), [])
        self.assertEqual(policy_errors("version: STSv1\nmode: testing\nmode: bogus\nmx: a.example\n"
                                       "max_age: 86400\n"), [])

    def test_wrong_value_is_not_also_missing(self) -> None:
        errors = policy_errors("version: STSv1\nmode: enforce\nmx: a..example\nmax_age: -1\n")
        self.assertEqual([number for number, _ in errors], [3, 4])


class CheckPolicyCommandTests(SynchronousTestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(list(argv), out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_reports_every_error(self) -> None:
        code, out, err = self.run_cli("check-policy", self.write(BROKEN))
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertEqual(err.splitlines(), [
            "invalid policy: line 2: mode 'bogus': expected enforce, testing or none",
            "invalid policy: line 3: expected 'name: value', got 'this is not a field'",
            "invalid policy: line 4: mx 'exa_mple..com': " + str(policy_errors(BROKEN)[2][1]).split(": ", 1)[1],
            "invalid policy: missing required field 'max_age'",
        ])

    def test_json_every_error(self) -> None:
        code, out, err = self.run_cli("check-policy", "--json", self.write(BROKEN))
        self.assertEqual(code, cli.EX_DATAERR)
        obj = json.loads(out)
        self.assertFalse(obj["valid"])
        self.assertEqual([e["line"] for e in obj["errors"]], [2, 3, 4, None])
        self.assertEqual((obj["reason"], obj["error"]), (obj["errors"][0]["reason"], obj["errors"][0]["error"]))
        self.assertEqual(obj["errors"][3]["error"], "missing required field 'max_age'")

    def test_missing_file(self) -> None:
        """A file that does not exist (or cannot be read): EX_NOINPUT, 66."""
        code, out, err = self.run_cli("check-policy", self.mktemp())
        self.assertEqual((code, out), (cli.EX_NOINPUT, ""))
        self.assertIn("No such file or directory", err)
        self.assertEqual(len(err.splitlines()), 1)
