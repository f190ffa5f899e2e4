"""Tests for L{mtasts_twisted.policy}: the RFC 8461/8460 grammar."""

import idna
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.policy import (
    MAX_MAX_AGE,
    DomainError,
    Mode,
    MTASTSError,
    MultipleRecordsError,
    NoRecordError,
    NotSTSRecordError,
    NotTLSRPTRecordError,
    Policy,
    PolicySyntaxError,
    RecordSyntaxError,
    is_address_literal,
    parse_policy,
    parse_sts_record,
    parse_tlsrpt_record,
    select_sts_record,
    select_tlsrpt_record,
    to_alabel,
    to_unicode,
)

GOOD = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 604800\n"


class STSRecordTests(SynchronousTestCase):
    def test_minimal(self):
        self.assertEqual(parse_sts_record("v=STSv1; id=20190429T010101").id, "20190429T010101")

    def test_space_before_delimiter(self):
        """Ruling: C{v=STSv1 ;} is accepted."""
        self.assertEqual(parse_sts_record("v=STSv1 ; id=abc").id, "abc")

    def test_duplicate_keeps_first(self):
        record = parse_sts_record("v=STSv1; id=first; x=1; id=second; x=2")
        self.assertEqual((record.id, record.extensions), ("first", (("x", "1"),)))

    def test_later_duplicate_ignored_whatever_its_value(self):
        """
        Ruling (RFC 8461 §3.2 "all entries except for the first SHALL be
        ignored"): a later C{id} that is no valid sts-id is ignored.
        """
        for text in ("v=STSv1; id=a; id=b-c", "v=STSv1; id=a; id=" + "b" * 40, "v=STSv1; id=a; x=1; id=!"):
            with self.subTest(text=text):
                self.assertEqual(parse_sts_record(text).id, "a")

    def test_later_duplicate_must_still_be_a_field(self):
        """
        A later duplicate off the §3.1 ABNF (not even an sts-extension)
        makes the record syntactically invalid.
        """
        for text in ("v=STSv1; id=a; id=", "v=STSv1; id=a; id=b=c", "v=STSv1; id=a; id", "v=STSv1; id=a; x=1; x="):
            with self.subTest(text=text):
                self.assertRaises(RecordSyntaxError, parse_sts_record, text)

    def test_first_occurrence_decides(self):
        """The first C{id} is the one that counts: an invalid one is not replaced by a later one."""
        self.assertRaises(RecordSyntaxError, parse_sts_record, "v=STSv1; id=b-c; id=a")

    def test_id_lengths(self):
        self.assertEqual(parse_sts_record("v=STSv1; id=" + "a" * 32).id, "a" * 32)
        self.assertRaises(RecordSyntaxError, parse_sts_record, "v=STSv1; id=" + "a" * 33)

    def test_other_txt_is_not_sts(self):
        for text in ("v=spf1 -all", "", "V=STSv1; id=a", "v=STSv1", " v=STSv1; id=a"):
            with self.subTest(text=text):
                self.assertRaises(NotSTSRecordError, parse_sts_record, text)

    def test_reasons(self):
        try:
            parse_sts_record("v=STSv1; id=")
        except RecordSyntaxError as e:
            self.assertEqual(e.reason, "record-syntax-error")
            self.assertIsInstance(e, MTASTSError)
        else:
            self.fail("no error")

    def test_select(self):
        record = select_sts_record(["v=spf1 -all", "v=STSv1; id=one", "hello"])
        self.assertEqual(record.id, "one")

    def test_select_none(self):
        e = self.assertRaises(NoRecordError, select_sts_record, ["v=spf1 -all"])
        self.assertEqual(e.reason, "no-record")
        self.assertRaises(NoRecordError, select_sts_record, [])

    def test_select_multiple(self):
        e = self.assertRaises(
            MultipleRecordsError, select_sts_record, ["v=STSv1; id=a", "v=STSv1; id=b"]
        )
        self.assertEqual(e.reason, "multiple-mta-sts-records")

    def test_select_multiple_counts_malformed(self):
        """A malformed STS record still counts as one of several (RFC 8461 §3.1)."""
        self.assertRaises(MultipleRecordsError, select_sts_record, ["v=STSv1; id=a", "v=STSv1;"])

    def test_select_malformed(self):
        self.assertRaises(RecordSyntaxError, select_sts_record, ["v=STSv1; id=a;;"])

    def test_select_exact_version_counted_first(self):
        """
        Ruling (RFC 8461 §3.1 "records that do not begin with "v=STSv1;" are
        discarded"): a record with white space before the ";" is counted
        only when no record begins exactly C{v=STSv1;}.
        """
        for txt in (["v=STSv1; id=a", "v=STSv1 ; id=b"], ["v=STSv1\t; id=b", "v=STSv1; id=a", "v=spf1 -all"],
                    ["v=STSv1; id=a", "v=STSv1 ;"]):
            with self.subTest(txt=txt):
                self.assertEqual(select_sts_record(txt).id, "a")

    def test_select_spaced_alone(self):
        """Ruling: C{v=STSv1 ;} alone is a record (the ABNF allows the WSP)."""
        self.assertEqual(select_sts_record(["v=STSv1 ; id=b", "v=spf1 -all"]).id, "b")
        self.assertRaises(RecordSyntaxError, select_sts_record, ["v=STSv1 ; id=b-c"])

    def test_select_spaced_multiple(self):
        e = self.assertRaises(MultipleRecordsError, select_sts_record, ["v=STSv1 ; id=a", "v=STSv1\t;id=b"])
        self.assertEqual(e.reason, "multiple-mta-sts-records")
        self.assertRaises(
            MultipleRecordsError, select_sts_record, ["v=STSv1; id=a", "v=STSv1; id=b", "v=STSv1 ; id=c"]
        )

    def test_select_exact_malformed_not_rescued(self):
        """The one record beginning C{v=STSv1;} is malformed: no policy, whatever the others."""
        self.assertRaises(RecordSyntaxError, select_sts_record, ["v=STSv1; id=a;;", "v=STSv1 ; id=b"])


class TLSRPTRecordTests(SynchronousTestCase):
    def test_percent_encoded(self):
        record = parse_tlsrpt_record("v=TLSRPTv1; rua=mailto:a%21b%3Bc@example.com")
        self.assertEqual(record.rua, ("mailto:a%21b%3Bc@example.com",))

    def test_unencoded_specials(self):
        for uri in ("mailto:a!b@example.com", "https://x.example/a,b"):
            with self.subTest(uri=uri):
                self.assertRaises(RecordSyntaxError, parse_tlsrpt_record, "v=TLSRPTv1; rua=" + uri)

    def test_not_tlsrpt(self):
        self.assertRaises(NotTLSRPTRecordError, parse_tlsrpt_record, "v=STSv1; id=a")

    def test_select_exact_version_counted_first(self):
        """The same ruling as for STS records (RFC 8460 §3 has the same words)."""
        record = select_tlsrpt_record(["v=TLSRPTv1 ; rua=mailto:b@r.example", "v=TLSRPTv1;rua=mailto:a@r.example"])
        self.assertEqual(record.rua, ("mailto:a@r.example",))
        record = select_tlsrpt_record(["v=TLSRPTv1 ; rua=mailto:b@r.example"])
        self.assertEqual(record.rua, ("mailto:b@r.example",))

    def test_select(self):
        record = select_tlsrpt_record(["v=TLSRPTv1; rua=https://r.example/x", "v=spf1"])
        self.assertEqual(record.rua, ("https://r.example/x",))
        e = self.assertRaises(
            MultipleRecordsError,
            select_tlsrpt_record,
            ["v=TLSRPTv1; rua=https://a.example/", "v=TLSRPTv1; rua=https://b.example/"],
        )
        self.assertEqual(e.reason, "multiple-tlsrpt-records")


class ParsePolicyTests(SynchronousTestCase):
    def test_good(self):
        policy = parse_policy(GOOD)
        self.assertEqual(policy.mode, Mode.ENFORCE)
        self.assertEqual(policy.mx, ("mx1.example.com", "*.example.net"))
        self.assertEqual(policy.max_age, 604800)
        self.assertEqual(policy.text, GOOD)

    def test_bytes_and_crlf(self):
        policy = parse_policy(GOOD.replace("\n", "\r\n").encode())
        self.assertEqual(policy, parse_policy(GOOD))

    def test_bom_and_blank_lines_ignored(self):
        text = "\ufeff\nversion: STSv1\n\n  \nmode: none\r\n\nmax_age: 5\n\n"
        policy = parse_policy(text.encode("utf-8"))
        self.assertEqual((policy.mode, policy.max_age, policy.mx), (Mode.NONE, 5, ()))
        self.assertEqual(policy.policy_strings, ("version: STSv1", "mode: none", "max_age: 5"))

    def test_max_age_clamped(self):
        policy = parse_policy(GOOD.replace("604800", "9999999999"))
        self.assertEqual(policy.max_age, MAX_MAX_AGE)

    def test_mx_lowercased(self):
        self.assertEqual(parse_policy(GOOD.replace("mx1", "MX1")).mx[0], "mx1.example.com")

    def test_alabel_mx(self):
        policy = parse_policy(GOOD.replace("mx1.example.com", "xn--bcher-kva.example"))
        self.assertEqual(policy.mx[0], "xn--bcher-kva.example")

    def test_alabel_mx_taken_as_written(self):
        """
        Ruling: an LDH A-label is accepted as written, even when its U-label
        is not IDNA 2008-valid (U+263A, U+2764 are symbols).
        """
        text = GOOD.replace("mx1.example.com", "XN--74H.example").replace("*.example.net", "*.xn--i-7iq.ws")
        policy = parse_policy(text)
        self.assertEqual(policy.mx, ("xn--74h.example", "*.xn--i-7iq.ws"))
        self.assertTrue(policy.matches("xn--74h.example"))
        self.assertTrue(policy.matches("mx.xn--i-7iq.ws."))
        self.assertFalse(policy.matches("☺.example"))  # not an IDNA 2008 U-label

    def test_first_wins(self):
        policy = parse_policy(GOOD + "mode: testing\nmax_age: 1\n")
        self.assertEqual((policy.mode, policy.max_age), (Mode.ENFORCE, 604800))

    def test_later_duplicate_ignored_whatever_its_value(self):
        """
        Ruling (RFC 8461 §3.2 "all entries except for the first SHALL be
        ignored"): a later duplicate that is no valid value of its field is
        ignored, not a syntax error (which would fail open).
        """
        text = "version: STSv1\nmode: testing\nmx: mx.example\nmode: bogus\nmax_age: 86400\n"
        self.assertEqual(parse_policy(text).mode, Mode.TESTING)
        policy = parse_policy(GOOD + "mode: bogus\nmax_age: soon\nversion: STSv2\nmax_age: 99999999999\n")
        self.assertEqual((policy.mode, policy.max_age, policy.extensions), (Mode.ENFORCE, 604800, ()))
        self.assertEqual(parse_policy(policy.to_text()), policy)

    def test_later_duplicate_must_still_be_a_field(self):
        """A later duplicate line that is no field of the ABNF at all is still an error."""
        for tail in ("mode: a\x01b\n", "mode:\n", "mode : testing\n", "max_age:  \n"):
            with self.subTest(tail=tail):
                self.assertRaises(PolicySyntaxError, parse_policy, GOOD + tail)

    def test_first_occurrence_decides(self):
        """The first C{mode} counts: an invalid one is not replaced by a later valid one."""
        text = "version: STSv1\nmode: bogus\nmode: testing\nmx: mx.example\nmax_age: 86400\n"
        self.assertRaises(PolicySyntaxError, parse_policy, text)

    def test_extensions_kept(self):
        policy = parse_policy(GOOD + "foo: bar baz\nfoo: second\n")
        self.assertEqual(policy.extensions, (("foo", "bar baz"),))

    def test_errors(self):
        cases = {
            "over size": GOOD + "x: " + "a" * 65536,
            "bad utf-8": GOOD.encode() + b"x: \xff\n",
            "bare CR": GOOD.replace("\n", "\r", 1),
            "IP literal mx": GOOD.replace("mx1.example.com", "192.0.2.1"),
            "bracketed mx": GOOD.replace("mx1.example.com", "[192.0.2.1]"),
            "inner wildcard": GOOD.replace("mx1.example.com", "mx.*.example.com"),
            "label too long": GOOD.replace("mx1", "a" * 64),
            "bad punycode": GOOD.replace("mx1", "xn--"),
            "trailing dot": GOOD.replace("mx1.example.com", "mx1.example.com."),
            "space before colon": GOOD.replace("mode:", "mode :"),
            "leading space": GOOD.replace("mode:", " mode:"),
            "no colon": GOOD + "garbage\n",
            "control in ext": GOOD + "x: a\x01b\n",
            "tab inside ext": GOOD + "x: a\tb\n",
            "empty": "",
            "only blanks": "\n\n \n",
        }
        for name, text in cases.items():
            with self.subTest(case=name):
                e = self.assertRaises(PolicySyntaxError, parse_policy, text)
                self.assertEqual(e.reason, "policy-syntax-error")
                self.assertTrue(str(e))

    def test_exactly_max_size(self):
        text = GOOD + "x: "
        text += "a" * (65536 - len(text) - 1) + "\n"
        self.assertEqual(len(text.encode()), 65536)
        self.assertEqual(parse_policy(text).extensions[0][0], "x")

    def test_to_text_round_trip(self):
        policy = parse_policy(GOOD + "ext: v\n")
        self.assertEqual(parse_policy(policy.to_text()), policy)


class MatchesTests(SynchronousTestCase):
    policy = Policy(mode=Mode.ENFORCE, max_age=1, mx=("mail.example.com", "*.example.net", "xn--bcher-kva.example"))

    def test_exact_case_dot(self):
        self.assertTrue(self.policy.matches("MAIL.Example.COM."))

    def test_wildcard_one_label(self):
        self.assertTrue(self.policy.matches("mx1.example.net"))
        self.assertFalse(self.policy.matches("example.net"))
        self.assertFalse(self.policy.matches("a.b.example.net"))

    def test_idn_host(self):
        self.assertTrue(self.policy.matches("bücher.example"))

    def test_garbage_host(self):
        for host in ("", ".", "192.0.2.1", "[192.0.2.1]", "a..example.net", "x" * 300):
            with self.subTest(host=host):
                self.assertFalse(self.policy.matches(host))


class DomainTests(SynchronousTestCase):
    def test_to_alabel(self):
        self.assertEqual(to_alabel("Bücher.Example."), "xn--bcher-kva.example")
        self.assertEqual(to_alabel("EXAMPLE.com"), "example.com")
        self.assertEqual(to_unicode("xn--bcher-kva.example"), "bücher.example")

    def test_rejects(self):
        for name in ("", ".", "a..b", "a" * 64 + ".example", ("a" * 60 + ".") * 5 + "com",
                     "[127.0.0.1]", "127.0.0.1", "::1", "exa mple.com", "-a.example", "xn--.example"):
            with self.subTest(name=name):
                self.assertRaises(DomainError, to_alabel, name)

    def test_alabel_taken_as_written(self):
        """
        Ruling: a syntactically valid LDH A-label passes through unchanged
        (lower-cased), whatever its Punycode decodes to.
        """
        cases = {
            "xn--74h.example": "xn--74h.example",
            "XN--I-7IQ.WS.": "xn--i-7iq.ws",
            "bücher.xn--74h.example": "xn--bcher-kva.xn--74h.example",
            "xn--zzzzzzzz.example": "xn--zzzzzzzz.example",
        }
        for name, alabel in cases.items():
            with self.subTest(name=name):
                self.assertEqual(to_alabel(name), alabel)

    def test_ulabels_converted_with_idna2008_uts46(self):
        """U-labels: UTS 46 mapping (non-transitional), then IDNA 2008."""
        cases = {
            "Bücher.Example": "xn--bcher-kva.example",
            "faß.de": "xn--fa-hia.de",
            "日本語。JP": "xn--wgv71a119e.jp",
            "ΑΒΓ.example": "xn--mxacd.example",
        }
        for name, alabel in cases.items():
            with self.subTest(name=name):
                self.assertEqual(to_alabel(name), alabel)
                self.assertEqual(to_alabel(name), idna.encode(name, uts46=True, transitional=False).decode().lower())
        for name in ("☺.example", "i❤.ws", "a\u200db.example"):
            with self.subTest(name=name):
                self.assertRaises(DomainError, to_alabel, name)

    def test_to_unicode_keeps_undecodable_alabels(self):
        """Display (and cache keys): an A-label IDNA 2008 cannot decode is kept."""
        self.assertEqual(to_unicode("xn--74h.example"), "xn--74h.example")
        self.assertEqual(to_unicode("XN--BCHER-KVA.xn--74h.example."), "bücher.xn--74h.example")
        self.assertEqual(to_unicode("ab--cd.example"), "ab--cd.example")

    def test_address_literal(self):
        self.assertTrue(is_address_literal("[IPv6:2001:db8::1]"))
        self.assertTrue(is_address_literal("192.0.2.1"))
        self.assertFalse(is_address_literal("example.com"))


# --- property tests -------------------------------------------------------------

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"  # no reserved (xn--) labels
)
names = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(lambda n: not is_address_literal(n))
patterns = st.one_of(names, names.map(lambda n: "*." + n))
policies = st.builds(
    Policy,
    mode=st.sampled_from(Mode),
    max_age=st.integers(0, MAX_MAX_AGE),
    mx=st.lists(patterns, min_size=1, max_size=5),
    extensions=st.lists(
        st.tuples(
            st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
                lambda k: k not in ("version", "mode", "mx", "max_age")
            ),
            st.from_regex(r"[!-~]([ !-~]{0,8}[!-~])?", fullmatch=True),
        ),
        max_size=3,
        unique_by=lambda kv: kv[0],
    ),
)


def reference_match(patterns, host):
    """A plain reading of RFC 8461 §4.1 for lower-case ASCII names."""
    host_labels = host.lower().rstrip(".").split(".")
    for pattern in patterns:
        pattern_labels = pattern.split(".")
        if pattern_labels[0] == "*":
            if len(host_labels) == len(pattern_labels) and host_labels[1:] == pattern_labels[1:]:
                return True
        elif host_labels == pattern_labels:
            return True
    return False


alabels = st.from_regex(r"xn--[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
ascii_names = st.lists(st.one_of(labels, alabels, st.sampled_from(["xn--bcher-kva", "xn--74h"])),
                       min_size=1, max_size=4).map(".".join).filter(lambda n: not is_address_literal(n))


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(ascii_names, st.booleans())
    def test_ascii_names_pass_through(self, name, upper):
        """Ruling: LDH names, A-labels included, are taken as written (lower-cased)."""
        self.assertEqual(to_alabel(name.upper() if upper else name), name)
        self.assertEqual(to_alabel(to_unicode(name)), name)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(), st.binary()))
    def test_parse_arbitrary_raises_only_syntax_error(self, text):
        try:
            parse_policy(text)
        except PolicySyntaxError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(["version: STSv1", "mode: enforce", "mode: x", "mx: a.example",
                                     "mx: *.b", "max_age: 1", "", " ", "ext: y", "\ufeff", "\r"]),
                    max_size=8), st.sampled_from(["\n", "\r\n"]))
    def test_parse_near_valid_raises_only_syntax_error(self, lines, newline):
        try:
            parse_policy(newline.join(lines))
        except PolicySyntaxError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(policies)
    def test_serialise_round_trip(self, policy):
        parsed = parse_policy(policy.to_text())
        self.assertEqual(parsed, policy)
        self.assertEqual(parse_policy(parsed.to_text()), parsed)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(patterns, min_size=1, max_size=4), names, st.booleans(), st.booleans())
    def test_matches_agrees_with_reference(self, mx, host, upper, dot):
        policy = Policy(mode=Mode.ENFORCE, max_age=1, mx=mx)
        candidate = (host.upper() if upper else host) + ("." if dot else "")
        self.assertEqual(policy.matches(candidate), reference_match(mx, candidate))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(patterns, min_size=1, max_size=4).flatmap(
        lambda mx: st.tuples(st.just(mx), st.sampled_from(mx), labels)))
    def test_matches_generated_hosts(self, args):
        """Hosts built from the patterns themselves, so that matches are common."""
        mx, pattern, label = args
        host = label + pattern[1:] if pattern.startswith("*.") else pattern
        assume(not is_address_literal(host))  # e.g. "1" + ".2.3.4": an IP never matches
        policy = Policy(mode=Mode.TESTING, max_age=1, mx=mx)
        self.assertTrue(policy.matches(host))
        self.assertEqual(policy.matches("x." + host), reference_match(mx, "x." + host))
