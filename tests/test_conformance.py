"""
The pure-grammar groups of the shared conformance vectors.

No vector here contradicts a ruling of DESIGN.md, so C{RULING_EXCEPTIONS} is
empty; a vector that ever does is listed there by C{vid} with the reason.
"""

from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted import policy
from tests.vectors import load_vectors

# vid -> why DESIGN.md's ruling overrides the vector's expectation
RULING_EXCEPTIONS: dict[str, str] = {}


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
