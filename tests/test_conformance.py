"""
The pure-grammar groups of the conformance vectors (tests/conformance/).

No vector here contradicts a ruling of docs/design.rst (the rulings of
issue 18 -- later duplicate fields ignored, C{v=STSv1;} records counted
before C{v=STSv1 ;} ones, A-labels taken as written -- change no vector's
outcome), so C{RULING_EXCEPTIONS} is empty; a vector that ever does is listed
there by C{vid} with the reason.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted import policy
from tests.vectors import VECTORS_PATH, load_vectors

# vid -> why docs/design.rst's ruling overrides the vector's expectation
RULING_EXCEPTIONS: dict[str, str] = {}

#: Every group of vectors.json, with how many vectors it holds.
GROUPS = {
    "sts_txt_record": 18,
    "sts_txt_lookup": 1,
    "sts_policy": 24,
    "mx_match": 8,
    "tlsrpt_txt_record": 31,
    "tlsrpt_txt_lookup": 1,
    "policy_fetch": 9,
}


class VectorsFileTests(SynchronousTestCase):
    """The vectors ship inside tests/, whole: a fresh clone runs them all."""

    def test_inside_the_tests(self):
        tests = os.path.dirname(os.path.abspath(__file__))
        self.assertEqual(os.path.dirname(os.path.dirname(VECTORS_PATH)), tests)
        self.assertTrue(os.path.exists(os.path.join(os.path.dirname(VECTORS_PATH), "README.md")))

    def test_every_group_whole(self):
        for group, count in GROUPS.items():
            with self.subTest(group=group):
                vectors = load_vectors(group)
                self.assertEqual(len(vectors), count)
                self.assertEqual(len({v["vid"] for v in vectors}), count)

    def test_unknown_group_is_an_error(self):
        self.assertRaises(KeyError, load_vectors, "no_such_group")


class ConformanceMixin:
    def run_group(self, group, check):
        vectors = load_vectors(group)
        self.assertTrue(vectors, f"group {group} is empty")
        ran = 0
        for vector in vectors:
            if vector["vid"] in RULING_EXCEPTIONS:
                continue
            with self.subTest(vid=vector["vid"]):
                check(vector, vector["expected"])
            ran += 1
        self.assertGreater(ran, 0)


class STSRecordVectorTests(ConformanceMixin, SynchronousTestCase):
    def test_sts_txt_record(self):
        def check(vector, expected):
            text = vector["input"]
            if expected["ok"]:
                record = policy.parse_sts_record(text)
                self.assertEqual(record.id, expected["id"])
                self.assertEqual([list(e) for e in record.extensions], expected["extensions"])
            elif expected["is_sts_record"]:
                self.assertRaises(policy.RecordSyntaxError, policy.parse_sts_record, text)
            else:
                self.assertRaises(policy.NotSTSRecordError, policy.parse_sts_record, text)

        self.run_group("sts_txt_record", check)

    def test_tlsrpt_txt_record(self):
        def check(vector, expected):
            text = vector["input"]
            if expected["ok"]:
                record = policy.parse_tlsrpt_record(text)
                flat = [uri for rua in expected["rua"] for uri in rua]
                self.assertEqual(list(record.rua), flat)
                self.assertEqual([list(e) for e in record.extensions], expected["extensions"])
            elif expected["is_tlsrpt_record"]:
                self.assertRaises(policy.RecordSyntaxError, policy.parse_tlsrpt_record, text)
            else:
                self.assertRaises(policy.NotTLSRPTRecordError, policy.parse_tlsrpt_record, text)

        self.run_group("tlsrpt_txt_record", check)

    def test_tlsrpt_txt_lookup(self):
        def check(vector, expected):
            record = policy.select_tlsrpt_record(vector["txt"])
            self.assertEqual(list(record.rua), [u for rua in expected["rua"] for u in rua])

        self.run_group("tlsrpt_txt_lookup", check)


class PolicyVectorTests(ConformanceMixin, SynchronousTestCase):
    def test_sts_policy(self):
        def check(vector, expected):
            if expected["ok"]:
                parsed = policy.parse_policy(vector["input"])
                self.assertEqual(parsed.mode.value, expected["mode"])
                self.assertEqual(parsed.max_age, expected["max_age"])
                self.assertEqual(list(parsed.mx), expected["mx"])
                self.assertEqual([list(e) for e in parsed.extensions], expected["extensions"])
                self.assertEqual(parsed.text, vector["input"])
            else:
                self.assertRaises(policy.PolicySyntaxError, policy.parse_policy, vector["input"])

        self.run_group("sts_policy", check)

    def test_mx_match(self):
        def check(vector, expected):
            parsed = policy.Policy(mode="enforce", max_age=86400, mx=vector["policy_mx"])
            self.assertEqual(parsed.matches(vector["host"]), expected)

        self.run_group("mx_match", check)
