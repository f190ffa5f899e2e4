"""
The Grafana dashboard and the Prometheus alerts in C{contrib/}: the alert
rules pass C{promtool check rules} and their own C{promtool test rules};
the dashboard's queries are valid PromQL (checked by promtool as recording
rules); and every metric either names is one the service exports (scraped
from a registry of L{make_registry}), and every exported metric is on the
dashboard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

from twisted.trial import unittest
from twisted.trial.unittest import SynchronousTestCase

from mtasts_twisted.metrics import ServiceStats, make_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALERTS = os.path.join(ROOT, "contrib", "prometheus", "alerts.yml")
ALERTS_TEST = os.path.join(ROOT, "contrib", "prometheus", "alerts_test.yml")
DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "mtasts.json")

_METRIC = re.compile(r"\bmtasts_[a-z0-9_]+\b")


def require_tool(name: str, environ: dict[str, str] | None = None) -> str:
    """
    The path of program C{name}; skip the test (naming it) when it is not
    installed, unless C{CI=true}: CI must run these tests.
    """
    env = os.environ if environ is None else environ
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        if env.get("CI", "").lower() == "true":
            raise RuntimeError(f"CI=true but {name} is not installed")
        raise unittest.SkipTest(f"{name} is not installed")
    return path


def exported_metrics() -> set[str]:
    """The sample names a service's registry exports (counters with C{_total})."""
    names = set()
    for family in make_registry(ServiceStats()).collect():
        names.add(family.name + "_total" if family.type == "counter" else family.name)
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_queries() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            queries.append(query["query"])
    return queries


def alert_text() -> str:
    with open(ALERTS, encoding="utf-8") as f:
        return f.read()


class MetricNamesTests(SynchronousTestCase):
    def test_exported(self) -> None:
        """The scrape has the metrics README lists."""
        self.assertLessEqual({"mtasts_deliveries_total", "mtasts_policy_refresh_failures_total",
                              "mtasts_queue_oldest_age_seconds", "mtasts_reports_total"}, exported_metrics())

    def test_dashboard_names_only_exported_metrics(self) -> None:
        """Every metric a dashboard query names is exported."""
        named = {m for q in dashboard_queries() for m in _METRIC.findall(q)}
        self.assertEqual(named - exported_metrics(), set())

    def test_dashboard_shows_every_metric(self) -> None:
        """Every exported metric is on the dashboard."""
        named = {m for q in dashboard_queries() for m in _METRIC.findall(q)}
        self.assertEqual(exported_metrics() - named, set())

    def test_alerts_name_only_exported_metrics(self) -> None:
        """Every metric an alert names is exported; the five alerts of the issue are there."""
        named = set(_METRIC.findall(alert_text()))
        self.assertEqual(named - exported_metrics(), set())
        self.assertLessEqual({"mtasts_deliveries_total", "mtasts_policy_refresh_failures_total",
                              "mtasts_reports_total", "mtasts_queue_oldest_age_seconds",
                              "mtasts_socketmap_requests_total"}, named)

    def test_dashboard_shape(self) -> None:
        """Panels have unique ids, a data source variable, and one query each at least."""
        with open(DASHBOARD, encoding="utf-8") as f:
            dashboard = json.load(f)
        ids = [p["id"] for p in dashboard["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in dashboard["panels"]:
            self.assertEqual(panel["datasource"]["uid"], "${datasource}")
            self.assertTrue(panel["targets"], panel["title"])


class PromtoolTests(SynchronousTestCase):
    def promtool(self, *args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, cwd=cwd,
                              timeout=120, check=False)

    def test_check_rules(self) -> None:
        """C{promtool check rules contrib/prometheus/alerts.yml} passes."""
        done = self.promtool("check", "rules", ALERTS)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("SUCCESS: 7 rules found", done.stdout)

    def test_rules_fire(self) -> None:
        """C{promtool test rules}: each alert fires on the series meant to fire it, and not on others."""
        done = self.promtool("test", "rules", os.path.basename(ALERTS_TEST), cwd=os.path.dirname(ALERTS_TEST))
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("SUCCESS", done.stdout)

    def test_dashboard_queries_are_promql(self) -> None:
        """
        The dashboard's panel queries parse (as recording rules, with its
        variables filled in; C{label_values} is Grafana's, not PromQL).
        """
        rules: list[dict[str, Any]] = [
            {"record": f"mtasts:dashboard_query_{n}", "expr": q.replace("$instance", ".*")}
            for n, q in enumerate(dashboard_queries()) if not q.startswith("label_values(")]
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)  # JSON is YAML
        done = self.promtool("check", "rules", path)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_skip_names_the_tool(self) -> None:
        """Without the tool a test skips naming it, and fails under CI=true."""
        self.patch(shutil, "which", lambda name: None)
        self.patch(os, "access", lambda path, mode: False)
        error = self.assertRaises(unittest.SkipTest, require_tool, "promtool", {})
        self.assertEqual(str(error), "promtool is not installed")
        self.assertRaises(RuntimeError, require_tool, "promtool", {"CI": "true"})
