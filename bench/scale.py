"""Figure 5: many providers on schedule, one beat, one worker; and django-celery-beat's own
scheduler with one PeriodicTask per provider as the baseline, in the same run."""

from __future__ import annotations

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
