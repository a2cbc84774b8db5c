"""Prometheus counters kept by the processes that refresh and read (the gauges read from the
database at scrape time are tokens.monitoring's).

Bounded by default: a counter's ``provider`` label is filled in only with
TOKENS_METRICS_PER_PROVIDER; otherwise it is empty, which Prometheus reads as no label at all,
so each counter has one series per outcome, error class or reason however many providers there
are (100,000 providers would otherwise make hundreds of thousands of series in every process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from tokens.conf import tokens_settings

# tokens' own registry: /tokens/metrics shows these, not whatever else shares the process
# (Flower's metrics, the client library's process and GC collectors).
REGISTRY = CollectorRegistry(auto_describe=True)


def per_provider() -> bool:
    """Whether metrics carry a series per provider (TOKENS_METRICS_PER_PROVIDER, default off)."""
    return bool(tokens_settings.METRICS_PER_PROVIDER)


class ByProvider:
    """A counter whose first label is the provider, as callers pass it: the provider's name
    with TOKENS_METRICS_PER_PROVIDER, "" otherwise (read on each call, so the setting can
    change at run time)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def labels(self, provider: str, *labels: str) -> Counter:
        return self.counter.labels(provider if per_provider() else "", *labels)


REFRESHES = ByProvider(
    Counter(
        "tokens_refreshes_total",
        "Refreshes that called the generator, by outcome (and provider, when asked for).",
        ["provider", "outcome"],
        registry=REGISTRY,
    )
)
REFRESH_FAILURES = ByProvider(
    Counter(
        "tokens_refresh_failures_total",
        "Failed refreshes, by error class (and provider, when asked for).",
        ["provider", "error_class"],
        registry=REGISTRY,
    )
)
# Histograms are labelled by generator kind, not provider: a bucket series per provider would
# be tens of thousands of series at 10,000 providers.
REFRESH_DURATION = Histogram(
    "tokens_refresh_duration_seconds",
    "Time spent in the generator per refresh, by generator kind.",
    ["kind"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
SCHEDULE_DISPATCHED = Counter(
    "tokens_schedule_dispatched_total",
    "Scheduled refreshes the dispatcher sent to the workers.",
    registry=REGISTRY,
)
SCHEDULE_LATENESS = Histogram(
    "tokens_schedule_lateness_seconds",
    "From a scheduled batch's oldest due time to a worker starting it.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 6, 10, 30, 60, 300),
    registry=REGISTRY,
)
WAITS = ByProvider(
    Counter(
        "tokens_get_token_waits_total",
        "get_token() calls that had to wait for a token (by provider, when asked for).",
        ["provider"],
        registry=REGISTRY,
    )
)
UNAVAILABLE = ByProvider(
    Counter(
        "tokens_get_token_unavailable_total",
        "get_token() calls that raised TokenUnavailable at once, by why (failing, reconnect).",
        ["provider", "reason"],
        registry=REGISTRY,
    )
)
TIMEOUTS = ByProvider(
    Counter(
        "tokens_get_token_timeouts_total",
        "get_token() calls that timed out (TokenUnavailable; by provider, when asked for).",
        ["provider"],
        registry=REGISTRY,
    )
)
