"""Figure 5: many providers on schedule, one beat, one worker; and django-celery-beat's own
scheduler with one PeriodicTask per provider as the baseline, in the same run."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from project import processes

if TYPE_CHECKING:
    from bench.__main__ import Report

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".state"
CALLS = "bench:sched"  # the generator pushes "<provider id>:<unix time>" for every call


def start_beat(name: str) -> subprocess.Popen[bytes]:
    log = open(STATE / f"bench-{name}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "project",
            "beat",
            "--loglevel=WARNING",
            f"--schedule={STATE / f'bench-{name}-schedule'}",
            f"--pidfile={STATE / f'bench-{name}.pid'}",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    import psutil

    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def stop(process: subprocess.Popen[bytes]) -> None:
    processes.stop(process, timeout=30)


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def fresh_database() -> None:
    from django.core.management import call_command

    call_command("flush", "--no-input", verbosity=0)  # post_migrate re-creates the dispatcher


def scale(report: Report, quick: bool) -> None:
    """N providers at one interval, spread over it the way sync_token_schedules spreads them;
    a warm-up period, then ``periods`` measured periods. Each scheduled due time must see one
    generator call within the period; lateness is that call's time minus the due time."""
    import redis
    from django.db import connection

    from tokens.models import Provider, ProviderState
    from tokens.services import schedule

    count, every, periods = (300, 5, 2) if quick else (10_000, 60, 2)
    fresh_database()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.delete(CALLS)
    interval = timedelta(seconds=every)
    providers = Provider.objects.bulk_create(
        [
            Provider(
                name=f"sc-{i}",
                kind="callable",
                config={"path": "bench.generators.scheduled"},
                refresh_interval=interval,
            )
            for i in range(count)
        ],
        batch_size=1000,
    )  # bulk_create sends no signals: sync_token_schedules gives them their schedule
    schedule.next_runs_sync_all()
    first_due = {
        pk: due.timestamp()
        for pk, due in ProviderState.objects.filter(
            provider_id__in=[p.pk for p in providers]
        ).values_list("provider_id", "next_run_at")
    }
    started = time.time()
    beat = start_beat("beat")
    try:
        window = (started + every, started + every * (1 + periods))
        sleep_until(window[0])
        beat_cpu = cpu_seconds(beat)
        # Mid-window, an operator shortens one provider's interval to a third. Its previous run
        # is over a third of the old interval ago, so the new schedule makes it due at once.
        edit_at = window[0] + every / 2
        new_interval = max(1, every // 3)
        margin = min(2.0, every / 5)  # --quick's 5 s interval leaves no room for 2 s each side
        victim = next(
            pk
            for pk, due in first_due.items()
            if new_interval + margin < (edit_at - due) % every < every - margin
        )
        sleep_until(edit_at)
        provider = Provider.objects.get(pk=victim)
        provider.refresh_interval = timedelta(seconds=new_interval)
        edited = time.time()
        provider.save()  # as admin does: the signal moves its next run
        sleep_until(window[1])
        beat_cpu = cpu_seconds(beat) - beat_cpu
        measured = window[1] - window[0]
        # One more period, so that a run due near the window's end has its whole period to
        # happen in (a late one counts as late, not as missed).
        sleep_until(window[1] + every)
    finally:
        stop(beat)
    calls: dict[int, list[float]] = {}
    for entry in client.lrange(CALLS, 0, -1):
        pk, at = entry.decode().split(":")
        calls.setdefault(int(pk), []).append(float(at))
    lateness, missed, extra, dues = [], 0, 0, 0
    for pk, first in first_due.items():
        if pk == victim:
            continue
        mine = sorted(calls.get(pk, []))
        due = first + every * max(0, int((window[0] - first) // every) + 1)
        while due < window[1]:
            dues += 1
            inside = [at for at in mine if due <= at < due + every]
            if inside:
                lateness.append(inside[0] - due)
                extra += len(inside) - 1
            else:
                missed += 1
            due += every
    after_edit = sorted(at for at in calls.get(victim, []) if at >= edited)
    effect = after_edit[0] - edited if after_edit else float("nan")
    gaps = [b - a for a, b in itertools.pairwise(after_edit)]
    p99 = statistics.quantiles(lateness, n=100)[98] if len(lateness) > 1 else float("nan")
    report.add(
        f"5. scale: {count:,} providers every {every} s, one beat, worker prefork -c 2, "
        f"{connection.vendor} ({dues:,} scheduled runs in {periods} periods)",
        f"lateness p99 {p99:.2f} s",
        f"p50 {statistics.median(lateness):.2f} s; {missed} missed, {extra} extra",
        f"{p99 / every:.1%} of the interval",
        "p99 ≤ 10 % of the interval, none missed",
    )
    report.add(
        f"5. scale: one provider's interval edited {every} s → {new_interval} s mid-run",
        f"next refresh {effect:.2f} s after the save",
        f"then every {statistics.median(gaps):.1f} s" if gaps else "—",
        "—",
        "≤ 5 s",
    )
    report.add(
        "5. scale: beat CPU while dispatching (tokens: one entry, every 1 s)",
        f"{beat_cpu / measured:.2%} of a core",
        f"{beat_cpu:.2f} s CPU in {measured:.0f} s",
        "—",
        "bounded",
    )
    beat_baseline(report, quick, count, every, tokens_cpu=beat_cpu / measured)


def beat_baseline(report: Report, quick: bool, count: int, every: int, tokens_cpu: float) -> None:
    """The design tokens did not take: one django-celery-beat PeriodicTask per provider. Beat
    sends to a queue no worker reads; the send time of each message is its expiry minus
    ``expire_seconds``, so lateness needs no worker at all."""
    import redis
    from django.utils import timezone
    from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

    from tokens.constants import DISPATCH_ENTRY

    fresh_database()
    PeriodicTask.objects.filter(name=DISPATCH_ENTRY).update(enabled=False)
    broker = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    broker.delete("bench-void")
    schedule, _ = IntervalSchedule.objects.get_or_create(
        every=every, period=IntervalSchedule.SECONDS
    )
    now = timezone.now()
    expire = 3600
    tasks = PeriodicTask.objects.bulk_create(
        [
            PeriodicTask(
                name=f"bench-baseline-{i}",
                task="bench.void",
                args=json.dumps([i]),
                queue="bench-void",
                interval=schedule,
                expire_seconds=expire,
                # due over the first interval, spread as tokens spreads providers
                last_run_at=now - timedelta(seconds=every) * (1 - (i * 0.6180339887498949) % 1),
            )
            for i in range(count)
        ],
        batch_size=1000,
    )
    due = {i: task.last_run_at.timestamp() + every for i, task in enumerate(tasks)}
    PeriodicTasks.update_changed()
    started = time.time()
    beat = start_beat("beat-baseline")
    try:
        sleep_until(started + every + 2)
        cpu = cpu_seconds(beat)
        ran = time.time() - started
    finally:
        stop(beat)
    lateness = []
    for raw in broker.lrange("bench-void", 0, -1):
        message = json.loads(raw)
        headers = message["headers"]
        index = json.loads(headers["argsrepr"].replace("(", "[").replace(",)", "]"))[0]
        expires = datetime.fromisoformat(headers["expires"])
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=UTC)
        sent_at = expires.timestamp() - expire
        # against the latest due time at or before the send (an entry runs once per interval)
        lateness.append((sent_at - due[index]) % every if sent_at >= due[index] else 0.0)
    broker.delete("bench-void")
    sent = len(lateness)
    expected = sum(
        1 + int((started + ran - at) // every) for at in due.values() if at <= started + ran
    )
    p99 = statistics.quantiles(lateness, n=100)[98] if sent > 1 else float("nan")
    report.add(
        f"5. baseline: django-celery-beat, one PeriodicTask per provider ({count:,}, every "
        f"{every} s), {ran:.0f} s",
        f"{sent:,} sent ({expected:,} due); send lateness p99 {p99:.1f} s",
        f"beat CPU {cpu / ran:.0%} of a core",
        f"tokens' beat uses {tokens_cpu / (cpu / ran):.1%} of that" if cpu else "—",
        "(the design not taken)",
    )


# ---------------------------------------------------------------------------- with real endpoints

# The bench's token endpoint listens on this many ports: origins, as TOKENS_HTTP_PER_HOST counts
# them (10,000 providers of a deployment spread over a few issuers).
ENDPOINT_PORTS = 10


def worker_rss(worker: subprocess.Popen[bytes]) -> int:
    import psutil

    main = psutil.Process(worker.pid)
    return sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])


def scale_endpoint(
    report: Report,
    worker: subprocess.Popen[bytes],
    *,
    count: int,
    every: int,
    periods: int,
    latency: float,
    figure: str = "5",
) -> None:
    """``count`` oauth2_client_credentials providers at one interval against the bench's token
    endpoint answering after ``latency`` seconds. Every scheduled due time must see a new token
    stored within its period; lateness is from the due time to that token's store, so it
    includes the endpoint's latency. Measured from a few seconds after the start (the first
    runs are already spread over the interval by each provider's phase), with a tail of 10 %
    of the interval for the last due times (a run later than that misses the target anyway)."""
    from django.db import connection

    from bench.endpoint import TokenEndpoint
    from project.celery import app
    from tokens.conf import tokens_settings
    from tokens.models import Provider, ProviderState, Token
    from tokens.services import schedule

    # Refreshes still queued from an earlier run name ids this run reuses (a flush restarts
    # PostgreSQL's sequences): they would be work this run did not schedule.
    with app.connection_for_write() as broker:
        for queue in ("celery", "tokens.urgent", "tokens.scheduled"):  # what bench's worker reads
            with contextlib.suppress(Exception):  # a queue not declared yet holds nothing
                broker.default_channel.queue_purge(queue)
    fresh_database()  # the dispatcher's entry is made again, at TOKENS_DISPATCH_EVERY
    interval = timedelta(seconds=every)
    with TokenEndpoint(latency=latency, ports=ENDPOINT_PORTS, lifetime=3600) as endpoint:
        providers: list[Provider] = []
        for start in range(0, count, 5000):
            providers += Provider.objects.bulk_create(
                [
                    Provider(
                        name=f"sc-{i}",
                        kind="oauth2_client_credentials",
                        config={
                            "token_url": endpoint.urls[i % ENDPOINT_PORTS],
                            "client_id": f"sc-{i}",
                        },
                        secret="bench-secret",
                        refresh_interval=interval,
                    )
                    for i in range(start, min(count, start + 5000))
                ],
                batch_size=1000,
            )
        schedule.next_runs_sync_all()
        first_due = {
            pk: due.timestamp()
            for pk, due in ProviderState.objects.values_list("provider_id", "next_run_at")
        }
        started = time.time()
        beat = start_beat("beat-endpoint")
        rss: list[int] = []
        try:
            warmup = 5.0
            window = (started + warmup, started + warmup + every * periods)
            tail = every * 0.1
            while time.time() < window[1] + tail:
                time.sleep(min(5.0, max(0.0, window[1] + tail - time.time())))
                rss.append(worker_rss(worker))
            beat_cpu = cpu_seconds(beat)
        finally:
            stop(beat)
        requests = endpoint.requests()
        ran = time.time() - started
        stores: dict[int, list[float]] = {}
        for pk, issued in Token.objects.values_list("provider_id", "issued_at").iterator(
            chunk_size=10_000
        ):
            stores.setdefault(pk, []).append(issued.timestamp())
        tick = dispatch_cost(count=count, every=every)  # after the snapshot: it refreshes some
    lateness, missed, extra, dues = [], 0, 0, 0
    for pk, first in first_due.items():
        mine = sorted(stores.get(pk, []))
        due = first
        while due < window[0]:
            due += every
        while due < window[1]:
            dues += 1
            inside = [at for at in mine if due <= at < due + every]
            if inside:
                lateness.append(inside[0] - due)
                extra += len(inside) - 1
            else:
                missed += 1
            due += every
    p99 = statistics.quantiles(lateness, n=100)[98] if len(lateness) > 1 else float("nan")
    p50 = statistics.median(lateness) if lateness else float("nan")
    report.add(
        f"{figure}. scale: {count:,} providers every {every} s against a token endpoint answering "
        f"after {latency * 1000:.0f} ms ({ENDPOINT_PORTS} ports), one beat, worker prefork -c 2, "
        f"{connection.vendor} ({dues:,} scheduled runs in {periods} period(s)), defaults",
        f"lateness p99 {p99:.2f} s (due → new token stored)",
        f"p50 {p50:.2f} s; {missed} missed, {extra} extra; {requests:,} token requests in "
        f"{ran:.0f} s",
        f"{p99 / every:.1%} of the interval",
        "p99 ≤ 10 % of the interval, none missed",
    )
    report.add(
        f"{figure}. scale: worker RSS during the {latency * 1000:.0f} ms run (main process + "
        f"2 prefork children; TOKENS_HTTP_CONCURRENCY {tokens_settings.HTTP_CONCURRENCY}, "
        f"TOKENS_DISPATCH_BATCH {tokens_settings.DISPATCH_BATCH})",
        f"max {max(rss) / 2**20:.0f} MiB",
        f"median {statistics.median(rss) / 2**20:.0f} MiB",
        "—",
        "report",
    )
    report.add(
        f"{figure}. scale: dispatcher cost per tick ({count:,} providers every {every} s, "
        f"{connection.vendor})",
        f"{tick[1] * 1000:.1f} ms to claim and send {tick[0]:,} due (median of 5)",
        f"beat's check per tick {tick[2] * 1000:.2f} ms; beat {beat_cpu / ran:.2%} of a core",
        "—",
        "report",
    )


def dispatch_cost(*, count: int, every: int) -> tuple[int, float, float]:
    """One tick's work at this size, timed here (the beat and worker ran it in the run): beat's
    "is anything due" query, and the dispatcher's claim and send of a tick's share of the
    providers (count / every of them, made due now). Timed once the worker's batches have
    ended (a running one would take the providers made due itself), its batches sent to a
    queue nobody reads."""
    import math

    from django.test import override_settings
    from django.utils import timezone

    from project.celery import app
    from tokens import selectors
    from tokens.models import ProviderState
    from tokens.redis_client import client, key
    from tokens.services import schedule

    ended = time.time() + 60
    while any((app.control.inspect(timeout=1).active() or {}).values()):
        assert time.time() < ended, "the worker's batches did not end"
        time.sleep(0.5)
    share = math.ceil(count / every)
    claims, checks = [], []
    with override_settings(TOKENS_QUEUE_SCHEDULED=COST_QUEUE):
        for _ in range(5):
            ids = list(
                ProviderState.objects.order_by("next_run_at").values_list("provider_id", flat=True)[
                    :share
                ]
            )
            ProviderState.objects.filter(provider_id__in=ids).update(
                next_run_at=timezone.now() - timedelta(seconds=1)
            )
            client().delete(key("schedule", "taken"))  # no batch takes them: it has ended
            began = time.perf_counter()
            selectors.schedule_has_due()
            checks.append(time.perf_counter() - began)
            began = time.perf_counter()
            sent = schedule.due_dispatch()
            claims.append(time.perf_counter() - began)
            assert sum(len(batch) for batch in sent) >= share
    with app.connection_for_write() as broker:
        broker.default_channel.queue_purge(COST_QUEUE)
    return share, statistics.median(claims), statistics.median(checks)


# Where dispatch_cost's batches go: no worker reads it.
COST_QUEUE = "bench.dispatch-cost"
