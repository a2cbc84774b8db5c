"""The Prometheus exposition: this process's counters (or every process's, in multiprocess
mode), and gauges read from the database when scraped.

With several processes (web, worker), set PROMETHEUS_MULTIPROC_DIR to a directory they share:
the metrics view then adds up every process's counters (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from tokens import metrics, selectors
from tokens.status import has_valid_token


class ProviderCollector(Collector):
    """Gauges read from the database when scraped."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        expiry = GaugeMetricFamily(
            "tokens_token_expiry_seconds",
            "Seconds until the current token expires (absent: no expiry or no valid token).",
            labels=["provider"],
        )
        valid = GaugeMetricFamily(
            "tokens_token_valid", "1 when the provider has a valid token.", labels=["provider"]
        )
        failures = GaugeMetricFamily(
            "tokens_consecutive_failures",
            "Failed refreshes since the last success.",
            labels=["provider"],
        )
        reconnect = GaugeMetricFamily(
            "tokens_reconnect_needed",
            "1 when the provider's connected account must be connected again (its grant is gone).",
            labels=["provider"],
        )
        for provider in selectors.providers_with_state(enabled=True):
            state = provider.state_or_none
            is_valid = has_valid_token(state, now)
            reconnect.add_metric([provider.name], 1.0 if state and state.reconnect_needed else 0.0)
            valid.add_metric([provider.name], 1.0 if is_valid else 0.0)
            failures.add_metric([provider.name], float(state.consecutive_failures if state else 0))
            if is_valid and state is not None and state.expires_at is not None:
                expiry.add_metric([provider.name], (state.expires_at - now).total_seconds())
        schedule = selectors.schedule_report(now=now)
        overdue = GaugeMetricFamily(
            "tokens_schedule_overdue_providers",
            "Enabled providers whose scheduled refresh is over a minute overdue (unclaimed).",
            value=float(schedule["overdue_providers"]),  # type: ignore[arg-type]
        )
        dispatcher = GaugeMetricFamily(
            "tokens_schedule_dispatcher_enabled",
            "1 when beat's dispatcher entry (PeriodicTask tokens.dispatch) exists and is enabled.",
            value=1.0 if schedule["dispatcher"] == "ok" else 0.0,
        )
        yield from (expiry, valid, failures, reconnect, overdue, dispatcher)


class _Own(Collector):
    """Only tokens' metrics of a collector that reads every process's files (others, Flower
    say, may write to the same directory)."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        return (m for m in self.collector.collect() if m.name.startswith("tokens_"))


def exposition() -> bytes:
    """The text exposition: counters (this process's, or all of them in multiprocess mode)
    followed by the gauges read from the database."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        processes = CollectorRegistry()
        processes.register(_Own(MultiProcessCollector(None)))
        counters = generate_latest(processes)
    else:
        counters = generate_latest(metrics.REGISTRY)
    database = CollectorRegistry()
    database.register(ProviderCollector())
    return counters + generate_latest(database)
