"""Figure 11: the operator surfaces and the web process at 100,000 providers (``--quick``: 5,000).

The providers are made with ``bulk_create`` (Provider, ProviderState, Token rows; no signals,
nothing refreshed), interval 10 minutes, with a realistic mix of statuses: most ok, some
failing, a few reconnect needed, expired, never refreshed or disabled. Then, in this process
through ``django.test.Client`` (in-process: no network, no web server; the whole middleware and
admin stack), p95 over 20 requests each (after 2 to warm up) of: admin's provider list (no
filter, each status, a kind, a search, page 2 and the last page), the list's status poll,
``/tokens/health/`` and ``/tokens/metrics`` (with its size and number of series), with 20
refresh locks held (refreshes in flight); and, first, the RSS a web-like process gains holding
every ok provider's token in memory (a subprocess calling ``get_token`` on each: Redis then
holds a cache entry per provider, as in production). The providers are removed at the end.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.__main__ import Report

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "large-"
INTERVAL = timedelta(minutes=10)
LIFETIME = timedelta(hours=1)
FIGURE = "11."
REQUESTS = 20
IN_FLIGHT = 20  # refresh locks held while the surfaces are measured
STATUSES = ("ok", "refreshing", "reconnect", "failing", "expired", "never", "disabled")
WARM_UP = 2
KINDS = ("static", "callable", "oauth2_client_credentials")


def status_for(i: int) -> str:
    """The status provider ``i`` is made in: per 1,000, 10 disabled, 30 failing, 5 reconnect
    needed, 5 expired, 5 never refreshed, the rest (945) ok."""
    slot = i % 1000
    for upper, status in (
        (10, "disabled"),
        (40, "failing"),
        (45, "reconnect"),
        (50, "expired"),
        (55, "never"),
    ):
        if slot < upper:
            return status
    return "ok"


def populate(count: int) -> Counter[str]:
    """Make ``count`` providers in the mix of ``status_for``; the number made in each status."""
    import random

    from django.utils import timezone

    from tokens import crypto
    from tokens.models import Provider, ProviderState, Token

    rng = random.Random(8)  # noqa: S311 (spread, not secrets)
    now = timezone.now()
    statuses = [status_for(i) for i in range(count)]
    batch = 2_000
    for start in range(0, count, batch):
        providers = []
        for i in range(start, min(count, start + batch)):
            status = statuses[i]
            kind = "oauth2_refresh_token" if status == "reconnect" else KINDS[i % len(KINDS)]
            config: dict[str, Any] = {}
            if kind == "callable":
                config = {"path": "bench.generators.instant"}
            elif kind.startswith("oauth2"):
                # Nothing refreshes them during the figure; if something did, a refused port.
                config = {"token_url": "https://127.0.0.1:9/token", "client_id": f"c{i}"}
            providers.append(
                Provider(
                    name=f"{PREFIX}{i:06d}",
                    kind=kind,
                    config=config,
                    secret=f"secret-{i:06d}" if kind != "callable" else "",
                    refresh_interval=INTERVAL,
                    enabled=status != "disabled",
                )
            )
        Provider.objects.bulk_create(providers, batch_size=1_000)
        states, tokens = [], []
        for provider in providers:
            i = int(provider.name.removeprefix(PREFIX))
            status = statuses[i]
            refreshed = now - INTERVAL * rng.random()
            # Scheduled runs a day away: a beat still running (figure 5's) sends none of them.
            state = ProviderState(
                provider=provider,
                next_run_at=refreshed + INTERVAL + timedelta(days=1),
                last_attempt_at=refreshed,
            )
            if status != "never":
                state.fence = state.current_version = 1
                state.last_refresh_at = refreshed
                state.expires_at = refreshed + LIFETIME
                state.fingerprint = "f" * 16
                value = f"token-{i:06d}-" + "x" * 35  # 48 characters
                tokens.append(
                    Token(
                        provider=provider,
                        version=1,
                        value=value,
                        fingerprint=crypto.fingerprint(value),
                        issued_at=refreshed,
                        expires_at=refreshed + LIFETIME,
                        refresh_at=refreshed + LIFETIME - timedelta(minutes=10),
                    )
                )
            else:
                state.last_attempt_at = None
            if status == "expired":
                state.last_refresh_at = now - 2 * LIFETIME
                state.expires_at = now - LIFETIME
            if status in ("failing", "reconnect"):
                state.consecutive_failures = 2
                state.last_error_at = now - timedelta(seconds=30)
                state.next_attempt_at = now + timedelta(minutes=2)
                state.last_error = (
                    "permanent: invalid_grant: the refresh token was revoked"
                    if status == "reconnect"
                    else "transient: token endpoint answered HTTP 503"
                )
                state.reconnect_needed = status == "reconnect"
                state.permanent_error = status == "reconnect"
            states.append(state)
        ProviderState.objects.bulk_create(states, batch_size=1_000)
        Token.objects.bulk_create(tokens, batch_size=1_000)
    return Counter(statuses)


def depopulate(count: int) -> None:
    """Remove the providers ``populate`` made, without a signal per row, and their cache
    entries in Redis (bench clean-up)."""
    from django.db import connection

    from tokens.models import Provider, ProviderState, Token
    from tokens.redis_client import client, key

    Token.objects.filter(provider__name__startswith=PREFIX)._raw_delete(connection.alias)
    ProviderState.objects.filter(provider__name__startswith=PREFIX)._raw_delete(connection.alias)
    Provider.objects.filter(name__startswith=PREFIX)._raw_delete(connection.alias)
    for start in range(0, count, 5_000):
        names = [f"{PREFIX}{i:06d}" for i in range(start, min(count, start + 5_000))]
        client().delete(*[key(kind, name) for name in names for kind in ("tok", "ver")])


def timed(client: Any, url: str, **headers: Any) -> tuple[list[float], Any, int]:
    """Seconds per request over REQUESTS requests (after WARM_UP), the last response and the
    number of database queries one request makes."""
    from django.db import connection

    for _ in range(WARM_UP):
        response = client.get(url, **headers)
        assert response.status_code in (200, 503), (url, response.status_code)
    queries: list[str] = []

    def count(execute: Any, sql: str, *args: Any) -> Any:
        queries.append(sql)
        return execute(sql, *args)

    with connection.execute_wrapper(count):
        client.get(url, **headers)
    timings = []
    for _ in range(REQUESTS):
        started = time.perf_counter()
        response = client.get(url, **headers)
        timings.append(time.perf_counter() - started)
    return timings, response, len(queries)


WEB = r"""
import sys, psutil
import django
django.setup()
from django.utils import timezone
from tokens import get_token, memory
from tokens.models import Provider
names = list(
    Provider.objects.filter(name__startswith=sys.argv[1], enabled=True,
                            refresh_state__consecutive_failures=0,
                            refresh_state__current_version__gt=0,
                            refresh_state__expires_at__gt=timezone.now())
    .values_list("name", flat=True)
)
import gc; gc.collect()
before = psutil.Process().memory_info().rss
for name in names:
    get_token(name, timeout=10)
after = psutil.Process().memory_info().rss
print(len(memory.memory), before, after, flush=True)
"""


def web_memory(report: Report) -> None:
    """RSS a web-like process gains reading every ok provider's token (kept in its memory)."""
    from django.db import connection

    web = subprocess.run(
        [sys.executable, "-c", WEB, PREFIX],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
        env={**os.environ},
    )
    held, before, after = (int(x) for x in web.stdout.split()[-3:])
    report.add(
        f"{FIGURE} web process RSS with {held:,} providers' tokens read ({connection.vendor})",
        f"{after / 2**20:.0f} MiB",
        f"{before / 2**20:.0f} MiB before reading them",
        f"{(after - before) / max(held, 1):.0f} B per provider",
        "≤ 1 KiB per provider",
    )


def surfaces(report: Report, quick: bool) -> None:
    """The figure (see the module's docstring); the providers it made are removed after."""
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client

    from bench.__main__ import ms, percentile
    from tokens import locks
    from tokens.models import Provider

    warnings.filterwarnings("ignore", "No directory at", UserWarning)  # WhiteNoise, no static
    count = 5_000 if quick else 100_000
    started = time.perf_counter()
    made = populate(count)
    print(
        f"  ({FIGURE} {count:,} providers made in {time.perf_counter() - started:.0f} s: "
        + ", ".join(f"{n:,} {s}" for s, n in made.most_common())
        + ")",
        flush=True,
    )
    try:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        # First, so that Redis then holds a cache entry per provider, as in production.
        web_memory(report)
        user, _ = User.objects.get_or_create(
            username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
        )
        # In-process requests: the test client, with a host the settings allow.
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(user)
        total = Provider.objects.count()
        where = f"{connection.vendor}, {total:,} providers, in-process test client"
        in_flight = [f"{PREFIX}{i:06d}" for i in range(100, 100 + IN_FLIGHT)]  # ok ones
        first = list(Provider.objects.filter(name__in=in_flight).values_list("pk", flat=True))
        page = ",".join(str(pk) for pk in Provider.objects.values_list("pk", flat=True)[:100])
        pages = [
            ("admin list, no filter", "/admin/tokens/provider/"),
            *[
                (f"admin list, status={status}", f"/admin/tokens/provider/?status={status}")
                for status in STATUSES
            ],
            ("admin list, kind=static", "/admin/tokens/provider/?kind__exact=static"),
            ("admin list, enabled=no", "/admin/tokens/provider/?enabled__exact=0"),
            ("admin list, search", f"/admin/tokens/provider/?q={PREFIX}04217"),
            ("admin list, page 2", "/admin/tokens/provider/?p=2"),
            # The deepest page walks half the list: pages past the middle are read from the end.
            ("admin list, middle page", f"/admin/tokens/provider/?p={math.ceil(total / 200)}"),
            ("admin list, last page", f"/admin/tokens/provider/?p={math.ceil(total / 100)}"),
            ("admin list, status=ok, middle page", status_page_url("ok", middle=True)),
            ("admin list, status=ok, last page", status_page_url("ok")),
            ("admin status poll (100 ids)", f"/admin/tokens/provider/status/?ids={page}"),
            ("/tokens/health/", "/tokens/health/"),
            ("/tokens/metrics", "/tokens/metrics"),
        ]
        for label, url in pages:
            # Refreshes in flight, as at 100,000 providers every 10 minutes (~170 a second).
            held = locks.locks_acquire(first)
            try:
                timings, response, queries = timed(client, url)
            finally:
                locks.locks_release(held)
            size = f"{len(response.content):,} B"
            if url != "/tokens/metrics":
                report.add(
                    f"{FIGURE} {label} ({where})",
                    f"p95 {ms(percentile(timings, 95))}",
                    f"p50 {ms(percentile(timings, 50))}, {queries} queries, {size}",
                    "—",
                    "p95 ≤ 300 ms",
                )
                continue
            text = response.content.decode()
            series = [line for line in text.splitlines() if line and not line.startswith("#")]
            report.add(
                f"{FIGURE} {label} ({where})",
                f"p95 {ms(percentile(timings, 95))}, {len(series):,} series, {size}",
                f"p50 {ms(percentile(timings, 50))}, {queries} queries",
                f"{len(series) / total:.4f} series per provider",
                "p95 ≤ 300 ms, bounded",
            )
    finally:
        depopulate(count)


def status_page_url(status: str, *, middle: bool = False) -> str:
    """The URL of the last (or the middle) page of the list filtered by ``status``."""
    from django.utils import timezone

    from tokens.models import Provider
    from tokens.status import Status, with_status

    matching = with_status(
        Provider.objects.all(), Status(status), refreshing=set(), now=timezone.now()
    ).count()
    pages = max(1, math.ceil(matching / 100))
    return f"/admin/tokens/provider/?status={status}&p={math.ceil(pages / 2) if middle else pages}"
