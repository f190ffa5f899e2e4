"""
Prometheus metrics for the C{twistd mtasts} service.

  - L{collect <mtasts_twisted.metrics.collect>}: the counters
    (L{ServiceStats}), the collector that reads them at scrape time and the
    wrappers that count (fetches, deliveries, TLS failures, reports); the
    metric names are listed there.
  - L{http <mtasts_twisted.metrics.http>}: the bounded HTTP endpoint that
    serves them (L{MetricsFactory}, L{MetricsLimits}).
"""

from mtasts_twisted.metrics.collect import (
    HostOutcome,
    HourlyCounts,
    MeteredDeliverer,
    MeteredFetcher,
    MeteredSink,
    ServiceStats,
    StatsCollector,
    count_report_outcomes,
    make_registry,
)
from mtasts_twisted.metrics.http import MetricsFactory, MetricsLimits, MetricsProtocol

__all__ = [
    "HostOutcome",
    "HourlyCounts",
    "MeteredDeliverer",
    "MeteredFetcher",
    "MeteredSink",
    "MetricsFactory",
    "MetricsLimits",
    "MetricsProtocol",
    "ServiceStats",
    "StatsCollector",
    "count_report_outcomes",
    "make_registry",
]
