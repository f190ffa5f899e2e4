"""
L{mtasts_twisted.overrides}: the overrides file, the overriding policy
source (with L{task.Clock}), the socketmap's answers through it, and the
metrics.
"""

from __future__ import annotations

import os

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.cache import Lookup, PolicyLookupTemporaryError
from mtasts_twisted.metrics import ServiceStats, make_registry
from mtasts_twisted.overrides import (
    OverriddenLookup,
    OverrideFileError,
    OverrideKind,
    OverrideTable,
    OverridingPolicySource,
    load_overrides,
    parse_overrides,
    source as overrides_source,
)
from mtasts_twisted.policy import Mode, parse_policy
from mtasts_twisted.results import FailureDetails, PolicyDescriptor, PolicyType, Result, ResultType
from mtasts_twisted.socketmap import SocketmapFactory, SocketmapSettings

from .test_socketmap import ServerTestCase

GOOD = """\
["example.com"]
action = "enforce"
mx = ["mx1.example.com", "*.example.net"]
reason = "no policy published yet"

["broken.example"]
action = "skip"
until = 2030-01-02
reason = "stale policy, ticket 99"

["Bücher.example"]
action = "dane-only"
"""

#: 2030-01-02T00:00:00Z
UNTIL = 1893542400.0
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.broken.example\nmax_age: 86400\n"


class ParseTests(SynchronousTestCase):
    def test_good_file(self) -> None:
        overrides = parse_overrides(GOOD, "o.toml")
        self.assertEqual(sorted(overrides), ["broken.example", "example.com", "xn--bcher-kva.example"])
        enforce = overrides["example.com"]
        self.assertEqual((enforce.kind, enforce.source, enforce.until), (OverrideKind.ENFORCE, "o.toml:1", None))
        assert enforce.policy is not None
        self.assertEqual((enforce.policy.mode, enforce.policy.mx), (Mode.ENFORCE, ("mx1.example.com", "*.example.net")))
        self.assertTrue(enforce.policy.matches("a.example.net"))
        skip = overrides["broken.example"]
        self.assertEqual((skip.kind, skip.until, skip.reason, skip.policy),
                         (OverrideKind.SKIP, UNTIL, "stale policy, ticket 99", None))
        self.assertEqual(skip.to_json()["until"], "2030-01-02T00:00:00+00:00")
        self.assertEqual(overrides["xn--bcher-kva.example"].kind, OverrideKind.DANE_ONLY)
        self.assertTrue(skip.active(UNTIL - 1))
        self.assertFalse(skip.active(UNTIL))

    def test_datetime_until(self) -> None:
        [o] = parse_overrides('["a.example"]\naction = "skip"\nuntil = 2030-01-02T12:00:00+02:00\n').values()
        self.assertEqual(o.until, UNTIL + 10 * 3600)

    def test_errors_are_one_line_with_the_line(self) -> None:
        cases = [
            ('["a.example"]\naction = \n', "o.toml:2: not valid TOML"),
            ('x = 1\n["a.example"]\naction = "enforce"\nmx = ["m.example"]\n', "o.toml: 'x': expected a table"),
            ('["a.example"]\naction = "enforce"\nmx = ["m.example"]\n\n["b.example"]\naction = "pin"\n',
             "o.toml:6: b.example: action 'pin': expected enforce, skip or dane-only"),
            ('["a.example"]\naction = "enforce"\n', "o.toml:1: a.example: mx: expected a non-empty list"),
            ('["a.example"]\naction = "enforce"\nmx = ["bad host!"]\n', "o.toml:3: a.example: mx: "),
            ('["a.example"]\naction = "skip"\n', "o.toml:1: a.example: skip needs until = DATE"),
            ('["a.example"]\naction = "skip"\nuntil = 2030-01-01T00:00:00\n', "o.toml:3: a.example: until: "),
            ('["a.example"]\naction = "skip"\nuntil = "soon"\n', "o.toml:3: a.example: until: expected a date"),
            ('["a.example"]\naction = "dane-only"\nmx = ["m.example"]\n', "o.toml:3: a.example: mx is for"),
            ('["a.example"]\naction = "dane-only"\nwhy = 1\n', "o.toml:3: a.example: unknown key 'why'"),
            ('["A.example"]\naction = "dane-only"\n["a.example."]\naction = "dane-only"\n',
             "o.toml:3: a.example.: the domain a.example is listed twice"),
            ('["[1.2.3.4]"]\naction = "dane-only"\n', "o.toml:1: '[1.2.3.4]': not a domain name"),
        ]
        for text, expected in cases:
            with self.assertRaises(OverrideFileError, msg=text) as cm:
                parse_overrides(text, "o.toml")
            message = str(cm.exception)
            self.assertEqual(len(message.splitlines()), 1, message)
            self.assertTrue(message.startswith(expected), (message, expected))

    def test_unreadable(self) -> None:
        with self.assertRaises(OverrideFileError) as cm:
            load_overrides("/nonexistent/o.toml")
        self.assertEqual(str(cm.exception), "/nonexistent/o.toml: cannot read it: No such file or directory")


def no_policy(domain: str) -> Lookup:
    return Lookup(None, Result(PolicyDescriptor(PolicyType.NO_POLICY_FOUND, domain)), True)


def published(domain: str, text: str = ENFORCE) -> Lookup:
    policy = parse_policy(text)
    descriptor = PolicyDescriptor(PolicyType.STS, domain, policy.policy_strings, policy.mx)
    return Lookup(policy, Result(descriptor), True, record_id="7")


class FakeCache:
    def __init__(self) -> None:
        self.answers: dict[str, Lookup | Exception] = {}
        self.asked: list[str] = []

    def get(self, domain: str):
        self.asked.append(domain)
        answer = self.answers.get(domain) or no_policy(domain)
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


class _SourceCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(UNTIL - 86400)
        self.cache = FakeCache()
        self.table = OverrideTable("o.toml", parse_overrides(GOOD, "o.toml"))
        self.events: list[dict] = []
        self.patch(overrides_source, "log", Logger(observer=self.events.append))

    def source(self, **kw) -> OverridingPolicySource:
        return OverridingPolicySource(self.cache, self.table, self.clock, **kw)

    def get(self, domain: str, **kw) -> Lookup:
        return self.successResultOf(self.source(**kw).get(domain))


class SourceTests(_SourceCase):
    def test_no_override_is_the_cache_answer_itself(self) -> None:
        answer = published("other.example")
        self.cache.answers["other.example"] = answer
        self.assertIs(self.get("other.example"), answer)

    def test_enforce_without_published_policy(self) -> None:
        """RFC 8460 §4.1: the result stays no-policy-found; never an sts policy the domain did not publish."""
        lookup = self.get("example.com")
        assert isinstance(lookup, OverriddenLookup) and lookup.policy is not None and lookup.override is not None
        self.assertEqual((lookup.policy.mode, lookup.policy.mx), (Mode.ENFORCE, ("mx1.example.com", "*.example.net")))
        self.assertEqual(lookup.override.kind, OverrideKind.ENFORCE)
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.NO_POLICY_FOUND)
        self.assertIsNone(lookup.published)

    def test_enforce_pins_over_a_published_policy(self) -> None:
        self.cache.answers["example.com"] = published("example.com")
        lookup = self.get("example.com")
        assert isinstance(lookup, OverriddenLookup) and lookup.policy is not None
        self.assertEqual(lookup.policy.mx, ("mx1.example.com", "*.example.net"))
        self.assertEqual(lookup.published, parse_policy(ENFORCE))
        self.assertEqual(lookup.result.policy.policy_type, PolicyType.STS)  # what the domain published

    def test_enforce_decides_on_a_temporary_failure(self) -> None:
        failure = FailureDetails(ResultType.STS_POLICY_FETCH_ERROR, failure_reason_code="dns-lookup")
        stopped = Result(PolicyDescriptor(PolicyType.STS, "example.com"), 0, [failure])
        self.assertEqual(stopped.failure_count, 1)
        self.cache.answers["example.com"] = PolicyLookupTemporaryError("SERVFAIL", stopped)
        lookup = self.get("example.com")
        assert lookup.policy is not None
        self.assertEqual(lookup.policy.mode, Mode.ENFORCE)
        # A detail only: the override decided, no session was stopped.
        self.assertEqual((lookup.result.failure_count, lookup.result.failures), (0, (failure,)))
        # Without an override, the failure stays a failure.
        self.cache.answers["x.example"] = PolicyLookupTemporaryError("SERVFAIL", stopped)
        self.failureResultOf(self.source().get("x.example"), PolicyLookupTemporaryError)

    def test_skip_logs_every_use_and_counts(self) -> None:
        self.cache.answers["broken.example"] = published("broken.example")
        source = self.source()
        for _ in range(3):
            lookup = self.successResultOf(source.get("broken.example"))
            assert isinstance(lookup, OverriddenLookup)
            self.assertIsNone(lookup.policy)
            self.assertIsNone(lookup.record_id)
            self.assertEqual(lookup.result.policy.policy_type, PolicyType.STS)  # the lookup's result as usual
        self.assertEqual(source.uses["skip"], 3)
        lines = [e for e in self.events if "skipping the MTA-STS policy" in e["log_format"]]
        self.assertEqual(len(lines), 3)
        self.assertEqual((lines[0]["domain"], lines[0]["reason"]), ("broken.example", "stale policy, ticket 99"))

    def test_skip_expires(self) -> None:
        """When the until date passes, the domain's own policy applies again."""
        self.cache.answers["broken.example"] = published("broken.example")
        source = self.source()
        self.assertIsNone(self.successResultOf(source.get("broken.example")).policy)
        self.clock.advance(86400 - 1)
        self.assertIsNone(self.successResultOf(source.get("broken.example")).policy)
        self.clock.advance(1)
        lookup = self.successResultOf(source.get("broken.example"))
        self.assertNotIsInstance(lookup, OverriddenLookup)
        self.assertEqual(lookup.policy, parse_policy(ENFORCE))
        self.assertEqual(source.uses["skip"], 2)

    def test_dane_only_answers_or_defers(self) -> None:
        self.cache.answers["xn--bcher-kva.example"] = published("xn--bcher-kva.example")
        lookup = self.get("xn--bcher-kva.example")
        assert isinstance(lookup, OverriddenLookup) and lookup.override is not None
        self.assertEqual(lookup.override.kind, OverrideKind.DANE_ONLY)
        self.assertEqual(lookup.policy, parse_policy(ENFORCE))  # the domain's own, for after DANE
        error = self.failureResultOf(self.source(defer_dane_only=True).get("xn--bcher-kva.example"),
                                     PolicyLookupTemporaryError).value
        self.assertIn("requires DANE", str(error))
        self.assertEqual(error.result.failure_count, 0)
        # The emergency switch restores the flow: the domain's policy, as testing.
        lookup = self.get("xn--bcher-kva.example", defer_dane_only=True, enforce_as_testing=True)
        assert lookup.policy is not None
        self.assertEqual(lookup.policy.mode, Mode.TESTING)

    def test_enforce_as_testing(self) -> None:
        self.cache.answers["other.example"] = published("other.example")
        source = self.source(enforce_as_testing=True)
        for _ in range(3):
            lookup = self.successResultOf(source.get("other.example"))
            assert isinstance(lookup, OverriddenLookup) and lookup.policy is not None
            self.assertEqual((lookup.policy.mode, lookup.as_testing, lookup.override), (Mode.TESTING, True, None))
            self.assertEqual(lookup.policy.mx, ("mx.broken.example",))
            self.assertEqual(lookup.result.policy.policy_strings, parse_policy(ENFORCE).policy_strings)
        # An override's enforce policy too.
        lookup = self.successResultOf(source.get("example.com"))
        assert lookup.policy is not None
        self.assertEqual(lookup.policy.mode, Mode.TESTING)
        self.assertEqual((source.uses["enforce-as-testing"], source.uses["enforce"]), (4, 1))
        # Logged on use, at most once per domain and USE_LOG_INTERVAL.
        lines = [e["domain"] for e in self.events if "--enforce-as-testing" in e["log_format"]]
        self.assertEqual(lines, ["other.example", "example.com"])
        self.clock.advance(overrides_source.USE_LOG_INTERVAL)
        self.successResultOf(source.get("other.example"))
        lines = [e["domain"] for e in self.events if "--enforce-as-testing" in e["log_format"]]
        self.assertEqual(lines, ["other.example", "example.com", "other.example"])
        # A testing or no policy is left alone.
        self.assertIsNone(self.successResultOf(source.get("nothing.example")).policy)

    def test_reload_good_and_bad(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(GOOD)
        table = OverrideTable.load(path)
        self.assertEqual(len(table.overrides), 3)
        with open(path, "w") as f:
            f.write('["new.example"]\naction = "dane-only"\n')
        self.assertTrue(table.reload())
        self.assertEqual(list(table.overrides), ["new.example"])
        with open(path, "w") as f:
            f.write('["new.example"]\naction = "dane-only"\n["b.example"]\naction = "nope"\n')
        self.assertFalse(table.reload())
        self.assertEqual(list(table.overrides), ["new.example"])  # the previous map stays
        self.assertEqual(table.last_error, f"{path}:4: b.example: action 'nope': expected enforce, skip or dane-only")
        [event] = [e for e in self.events if "NOT reloaded" in e["log_format"]]
        self.assertEqual(event["error"], table.last_error)
        os.remove(path)
        self.assertFalse(table.reload())
        self.assertEqual(dict(table.reloads), {"ok": 1, "failed": 2})


class AppliedTests(_SourceCase):
    """C{applied}: a cache answer through the overrides as C{get} would, asking, counting and logging nothing."""

    def test_same_decisions_as_get(self) -> None:
        for domain in ("example.com", "broken.example", "xn--bcher-kva.example", "other.example"):
            self.cache.answers[domain] = published(domain)
        for kw in ({}, {"enforce_as_testing": True}):
            source = self.source(**kw)
            for domain in ("example.com", "broken.example", "xn--bcher-kva.example", "other.example"):
                self.assertEqual(source.applied(published(domain), domain), self.get(domain, **kw), (domain, kw))
            self.assertEqual(source.uses, {})
        events = len(self.events)
        self.assertGreater(events, 0)  # get logged its skip and --enforce-as-testing uses
        source = self.source(enforce_as_testing=True)
        source.applied(published("broken.example"), "broken.example")
        source.applied(published("other.example"), "other.example")
        self.assertEqual((len(self.events), source.uses), (events, {}))
        self.assertEqual(self.cache.asked.count("other.example"), 2)  # by the two gets only

    def test_nothing_cached(self) -> None:
        """Nothing cached: an override still decides; without one the answer stays None."""
        source = self.source()
        self.assertIsNone(source.applied(None, "other.example"))
        lookup = source.applied(None, "example.com")
        assert isinstance(lookup, OverriddenLookup) and lookup.policy is not None
        self.assertEqual((lookup.policy.mx, lookup.published), (("mx1.example.com", "*.example.net"), None))
        self.assertIsNone(self.source().applied(None, "broken.example").policy)  # type: ignore[union-attr]
        self.assertRaises(PolicyLookupTemporaryError,
                          self.source(defer_dane_only=True).applied, None, "xn--bcher-kva.example")

    def test_words(self) -> None:
        """The sender's action and the override line, as C{lookup} and the status page say them."""
        from mtasts_twisted.overrides import override_text, sender_action

        source = self.source()
        dane = source.applied(published("xn--bcher-kva.example"), "xn--bcher-kva.example")
        assert isinstance(dane, OverriddenLookup) and dane.override is not None
        self.assertIn("a relay without --dane defers", sender_action(dane))
        self.assertIn("the relay (no --dane) defers", sender_action(dane, relay_dane=False))
        self.assertIn("only to MX hosts DANE authenticates", sender_action(dane, relay_dane=True))
        self.assertEqual(override_text(dane.override), "dane-only (o.toml:11)")
        skip = source.applied(published("broken.example"), "broken.example")
        assert isinstance(skip, OverriddenLookup) and skip.override is not None
        self.assertEqual(sender_action(skip), "deliver as usual (opportunistic TLS): no MTA-STS policy applies")
        self.assertEqual(override_text(skip.override),
                         "skip (o.toml:6), until 2030-01-02T00:00:00+00:00: stale policy, ticket 99")
        enforce = source.applied(None, "example.com")
        assert isinstance(enforce, OverriddenLookup) and enforce.override is not None
        self.assertEqual(override_text(enforce.override),
                         "enforce (o.toml:1), mx mx1.example.com *.example.net: no policy published yet")
        self.assertIn("to MX hosts the policy names", sender_action(enforce))


class SocketmapOverrideTests(ServerTestCase):
    """The socketmap asks the same source and answers its decision."""

    settings = SocketmapSettings(idle_timeout=60.0)

    def make_factory(self, settings):
        self.clock.advance(0)
        table = OverrideTable("o.toml", parse_overrides(GOOD, "o.toml"))
        self.source = OverridingPolicySource(self.cache, table, self.clock)
        return SocketmapFactory(self.source, self.resolver, self.clock, settings, sink=self.sink,
                                metrics=self.counter)

    def test_enforce_override(self) -> None:
        self.resolver.mx["example.com"] = [(10, "mx1.example.com"), (20, "b.example.net"), (30, "x.y.example.net")]
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com:b.example.net servername=hostname"])
        # The lookup's own result is recorded: no-policy-found, never a made-up sts policy.
        self.assertEqual([r.policy.policy_type for r in self.sink.results], [PolicyType.NO_POLICY_FOUND])

    def test_enforce_override_without_tlsrpt_attributes(self) -> None:
        self.factory = self.make_factory(SocketmapSettings(idle_timeout=60.0, tlsrpt_attributes=True))
        self.proto, self.transport = self.connect()
        self.resolver.mx["example.com"] = [(10, "mx1.example.com")]
        self.assertEqual(self.ask("example.com"), ["OK secure match=mx1.example.com servername=hostname"])

    def test_skip_is_no_policy(self) -> None:
        self.publish("broken.example", ENFORCE, mx=(("mx.broken.example", 10),))
        self.assertEqual(self.ask("broken.example"), ["NOTFOUND "])
        self.assertEqual(self.source.uses["skip"], 1)
        self.assertEqual(self.sink.results[0].policy.policy_type, PolicyType.STS)
        # Expired: the domain's policy applies again (the socketmap memo does not hide it).
        self.clock.advance(UNTIL - self.clock.seconds())
        self.assertEqual(self.ask("broken.example"), ["OK secure match=mx.broken.example servername=hostname"])

    def test_dane_only(self) -> None:
        self.assertEqual(self.ask("bücher.example", "[xn--bcher-kva.example]:25"), ["OK dane-only"] * 2)
        self.assertEqual(self.factory.counts["ok"], 2)

    def test_enforce_as_testing(self) -> None:
        self.source.enforce_as_testing = True
        self.publish()
        self.assertEqual(self.ask("example.org", "example.com"), ["NOTFOUND ", "NOTFOUND "])
        self.assertEqual(self.source.uses["enforce-as-testing"], 1)  # example.org has none


class MetricsTests(SynchronousTestCase):
    def test_families(self) -> None:
        stats = ServiceStats()
        registry = make_registry(stats)
        self.assertIsNone(registry.get_sample_value("mtasts_enforce_as_testing"))
        table = OverrideTable("o.toml", parse_overrides(GOOD, "o.toml"))
        source = OverridingPolicySource(FakeCache(), table, Clock(), enforce_as_testing=True)
        stats.overrides = source
        self.assertEqual(registry.get_sample_value("mtasts_enforce_as_testing"), 1)
        self.assertEqual(registry.get_sample_value("mtasts_policy_overrides"), 3)
        source.get("example.com")
        source.get("broken.example")
        source.get("broken.example")
        table.reloads["failed"] += 1
        self.assertEqual(registry.get_sample_value("mtasts_enforce_as_testing_uses_total"), 1)
        self.assertEqual(registry.get_sample_value("mtasts_policy_override_uses_total", {"kind": "skip"}), 2)
        self.assertEqual(registry.get_sample_value("mtasts_policy_override_uses_total", {"kind": "enforce"}), 1)
        self.assertEqual(registry.get_sample_value("mtasts_policy_override_uses_total", {"kind": "dane-only"}), 0)
        self.assertEqual(registry.get_sample_value("mtasts_policy_override_reloads_total", {"outcome": "failed"}), 1)
        source.enforce_as_testing = False
        self.assertEqual(registry.get_sample_value("mtasts_enforce_as_testing"), 0)



