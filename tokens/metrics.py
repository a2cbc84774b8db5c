"""Prometheus metrics: counters kept by the processes that refresh and read, and gauges read
from the database at scrape time.

With several processes (web, worker), set PROMETHEUS_MULTIPROC_DIR to a directory they share:
the metrics view then adds up every process's counters (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from django.utils import timezone
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from tokens.models import Provider
from tokens.status import has_valid_token, schedule_report, state_or_none

REFRESHES = Counter(
    "tokens_refreshes_total",
    "Refreshes that called the generator, by outcome.",
    ["provider", "outcome"],
)
REFRESH_FAILURES = Counter(
    "tokens_refresh_failures_total",
    "Failed refreshes, by error class.",
    ["provider", "error_class"],
)
# Histograms are labelled by generator kind, not provider: a bucket series per provider would
# be tens of thousands of series at 10,000 providers.
REFRESH_DURATION = Histogram(
    "tokens_refresh_duration_seconds",
    "Time spent in the generator per refresh, by generator kind.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SCHEDULE_DISPATCHED = Counter(
    "tokens_schedule_dispatched_total",
    "Scheduled refreshes the dispatcher sent to the workers.",
)
SCHEDULE_LATENESS = Histogram(
    "tokens_schedule_lateness_seconds",
    "From a scheduled batch's oldest due time to a worker starting it.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 6, 10, 30, 60, 300),
)
WAITS = Counter(
    "tokens_get_token_waits_total",
    "get_token() calls that had to wait for a token.",
    ["provider"],
)
TIMEOUTS = Counter(
    "tokens_get_token_timeouts_total",
    "get_token() calls that timed out (TokenUnavailable).",
    ["provider"],
)


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
        for provider in Provider.objects.enabled().select_related("refresh_state"):
            state = state_or_none(provider)
            is_valid = has_valid_token(state, now)
            valid.add_metric([provider.name], 1.0 if is_valid else 0.0)
            failures.add_metric([provider.name], float(state.consecutive_failures if state else 0))
            if is_valid and state is not None and state.expires_at is not None:
                expiry.add_metric([provider.name], (state.expires_at - now).total_seconds())
        schedule = schedule_report(now=now)
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
        yield from (expiry, valid, failures, overdue, dispatcher)


def exposition() -> bytes:
    """The text exposition: counters (this process's, or all of them in multiprocess mode)
    followed by the gauges read from the database."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        processes = CollectorRegistry()
        MultiProcessCollector(processes)
        counters = generate_latest(processes)
    else:
        counters = generate_latest(REGISTRY)
    database = CollectorRegistry()
    database.register(ProviderCollector())
    return counters + generate_latest(database)
