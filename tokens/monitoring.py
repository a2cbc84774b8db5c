"""The Prometheus exposition: this process's counters (or every process's, in multiprocess
mode), and gauges read from the database when scraped: bounded whatever the number of
providers, with a series per provider only when TOKENS_METRICS_PER_PROVIDER asks for it.

With several processes (web, worker), set PROMETHEUS_MULTIPROC_DIR to a directory they share:
the metrics view then adds up every process's counters (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime

from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from tokens import metrics, selectors
from tokens.status import has_valid_token


class ProviderCollector(Collector):
    """Gauges read from the database when scraped: a few series whatever the number of
    providers, and a series per provider only with TOKENS_METRICS_PER_PROVIDER."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        summary = selectors.provider_summary(now=now)
        by_status = GaugeMetricFamily(
            "tokens_providers",
            "Providers by status (as admin's badge shows it).",
            labels=["status"],
        )
        for status, count in summary.by_status.items():
            by_status.add_metric([status.value], float(count))
        unhealthy = GaugeMetricFamily(
            "tokens_providers_unhealthy",
            "Enabled providers with no valid token or whose connected account must be "
            "connected again (what turns /tokens/health/ to 503).",
            value=float(summary.unhealthy),
        )
        attention = GaugeMetricFamily(
            "tokens_providers_needing_attention",
            "Enabled providers that are not ok: no valid token, failing or reconnect needed.",
            value=float(summary.needing_attention),
        )
        yield from (by_status, unhealthy, attention)
        if summary.soonest_expiry is not None:
            yield GaugeMetricFamily(
                "tokens_token_expiry_soonest_seconds",
                "Seconds until the soonest expiry among enabled providers' valid tokens "
                "(absent: none expires).",
                value=(summary.soonest_expiry - now).total_seconds(),
            )
        if metrics.per_provider():
            yield from _per_provider(now)
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
        yield from (overdue, dispatcher)


def _per_provider(now: datetime) -> Iterator[Metric]:
    """Four series per enabled provider (TOKENS_METRICS_PER_PROVIDER)."""
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
    for provider in selectors.providers_enabled_with_state():
        state = provider.state_or_none
        is_valid = has_valid_token(state, now)
        reconnect.add_metric([provider.name], 1.0 if state and state.reconnect_needed else 0.0)
        valid.add_metric([provider.name], 1.0 if is_valid else 0.0)
        failures.add_metric([provider.name], float(state.consecutive_failures if state else 0))
        if is_valid and state is not None and state.expires_at is not None:
            expiry.add_metric([provider.name], (state.expires_at - now).total_seconds())
    yield from (expiry, valid, failures, reconnect)


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
