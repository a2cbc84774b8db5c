"""tokens benchmarks: ``python3 dev.py bench [--quick]``.

Prints each figure of the performance issue as a table row with its baseline and ratio, all
measured in the same run on this machine. Uses DATABASE_URL / REDIS_URL when set; otherwise a
SQLite file under .state/ and an embedded Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from project import processes

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / ".state"


def setup_environment(redis_url: str, database_url: str) -> None:
    from cryptography.fernet import Fernet

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ["REDIS_URL"] = redis_url
    os.environ.setdefault("CELERY_BROKER_URL", redis_url.rsplit("/", 1)[0] + "/1")
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-" + os.urandom(32).hex())
    os.environ.setdefault("TOKENS_CALLABLES", "bench.generators.instant,bench.generators.scheduled")
    os.environ.setdefault("TOKENS_ENCRYPTION_KEYS", Fernet.generate_key().decode())
    os.environ.setdefault("TOKENS_MIN_REFRESH_INTERVAL", "1")
    os.environ.setdefault("DJANGO_LOG_LEVEL", "WARNING")


def per_call(function, number: int, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds per call over ``repeat`` batches of ``number`` calls."""
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            function()
        timings.append((time.perf_counter() - started) / number)
    return statistics.median(timings)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, figure: str, value: str, baseline: str, ratio: str, target: str) -> None:
        self.rows.append((figure, value, baseline, ratio, target))
        print(f"  {figure}: {value} | baseline {baseline} | {ratio} | target {target}", flush=True)

    def table(self) -> str:
        head = ("figure", "measured", "baseline (same run)", "ratio", "target")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.3f} µs"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


# ---------------------------------------------------------------------------- figures


def warm_read(report: Report, quick: bool) -> None:
    from django.core.cache.backends.redis import RedisCache
    from django_redis.cache import RedisCache as DjangoRedisCache

    from tokens import get_token
    from tokens.constants import Reason
    from tokens.models import Provider
    from tokens.services.refresh import token_refresh

    provider = Provider.objects.create(
        name="warm", kind="callable", config={"path": "bench.generators.instant"}
    )
    token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    value = get_token("warm")
    plain = {"warm": value}
    url = os.environ["REDIS_URL"]
    builtin = RedisCache(url, {})
    django_redis = DjangoRedisCache(url, {})
    builtin.set("bench-key", value)
    django_redis.set("bench-key", value)
    fast, slow = (20_000, 300) if quick else (200_000, 3_000)
    repeat = 5 if quick else 9
    t_dict = per_call(lambda: plain.get("warm"), fast, repeat)
    t_get = per_call(lambda: get_token("warm"), fast, repeat)
    t_builtin = per_call(lambda: builtin.get("bench-key"), slow, repeat)
    t_django_redis = per_call(lambda: django_redis.get("bench-key"), slow, repeat)
    report.add(
        "1. warm get_token() vs dict.get",
        us(t_get),
        f"dict.get {us(t_dict)}",
        f"{t_get / t_dict:.1f}×",
        "≤ 10×",
    )
    report.add(
        "1. Django RedisCache.get vs warm get_token()",
        us(t_builtin),
        f"get_token {us(t_get)}",
        f"{t_builtin / t_get:.0f}× slower",
        "≥ 100×",
    )
    report.add(
        "1. django-redis get vs warm get_token()",
        us(t_django_redis),
        f"get_token {us(t_get)}",
        f"{t_django_redis / t_get:.0f}× slower",
        "≥ 100×",
    )


READER = r"""
import json, os, sys, time
import django
django.setup()
from tokens import get_token
name, until = sys.argv[1], float(sys.argv[2])
seen, last = [], None
get_token(name, timeout=10)
print("ready", flush=True)
while time.time() < until:
    value = get_token(name, timeout=10)
    if value != last:
        seen.append((value, time.time()))
        last = value
    time.sleep(0.0002)
print(json.dumps(seen), flush=True)
"""


def freshness(report: Report, quick: bool) -> None:
    from tokens.constants import Reason
    from tokens.models import Provider
    from tokens.services.refresh import token_refresh

    refreshes = 40 if quick else 200
    provider = Provider.objects.create(
        name="fresh", kind="callable", config={"path": "bench.generators.instant"}
    )
    token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    until = time.time() + 8 + refreshes * 0.06
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, "fresh", str(until)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for reader in readers:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    stored: dict[str, float] = {}
    for _ in range(refreshes):
        result = token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
        assert result.token is not None
        stored[result.token.value] = time.time()
        time.sleep(0.05)
    lags = []
    for reader in readers:
        out, _ = reader.communicate(timeout=120)
        for value, at in json.loads(out.strip().splitlines()[-1]):
            if value in stored:
                lags.append(max(0.0, at - stored[value]))
    missed = refreshes * 4 - len(lags)
    report.add(
        f"2. memory layer: new token seen by other processes ({len(lags)} samples, "
        f"{missed} superseded before seen)",
        f"p99 {ms(percentile(lags, 99))}",
        f"p50 {ms(percentile(lags, 50))}",
        "—",
        "p99 ≤ 50 ms",
    )


def start_worker(concurrency: int = 2) -> subprocess.Popen[bytes]:
    log = open(STATE / "bench-worker.log", "ab")  # noqa: SIM115  (every worker of a run)
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "project",
            "worker",
            "--loglevel=WARNING",
            f"--concurrency={concurrency}",
            # One worker for both lanes, as the figures were first measured.
            "--queues=celery,tokens.urgent,tokens.scheduled",
            "--without-gossip",
            "--without-mingle",
            "--hostname=bench@%h",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    from project.celery import app

    deadline = time.monotonic() + 30
    while not app.control.ping(timeout=0.5):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError("the benchmark worker did not start (.state/bench-worker.log)")
    return worker


def cold_first_token(report: Report, quick: bool) -> None:
    from tokens import get_token
    from tokens.models import Provider, ProviderState

    count = 20 if quick else 100
    providers = Provider.objects.bulk_create(
        [
            Provider(name=f"cold-{i}", kind="callable", config={"path": "bench.generators.instant"})
            for i in range(count)
        ]
    )  # no signals: nothing is fetched until get_token() asks...
    # ...but with the state row that saving a provider makes
    ProviderState.objects.bulk_create([ProviderState(provider=p) for p in providers])
    timings = []
    for i in range(count):
        started = time.perf_counter()
        get_token(f"cold-{i}", timeout=10)
        timings.append(time.perf_counter() - started)
    report.add(
        f"3. cold first token, worker running, instant generator ({count} providers)",
        f"p50 {ms(statistics.median(timings))}",
        f"p95 {ms(percentile(timings, 95))}",
        "—",
        "p50 ≤ 50 ms",
    )


def cold_burst(report: Report) -> None:
    import redis

    from tokens.models import Provider

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.delete("bench:go", "bench:calls:burst")
    Provider.objects.bulk_create(
        [Provider(name="burst", kind="callable", config={"path": "bench.generators.instant"})]
    )
    # The same callers as the cold-burst test (tests/callers.py): 4 processes x 50 threads.
    callers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.callers", "burst", "50", "bench:go"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(3)
    client.set("bench:go", "1")
    results = [json.loads(c.communicate(timeout=60)[0].strip().splitlines()[-1]) for c in callers]
    ok = sum(len(r["results"]) for r in results)
    errors = sum(len(r["errors"]) for r in results)
    calls = int(client.get("bench:calls:burst") or 0)
    report.add(
        "4. cold burst: 200 callers over 4 processes",
        f"{calls} generator call(s)",
        f"{ok} got the token, {errors} errors",
        "—",
        "1 call, 0 errors",
    )
    for error in sorted({e for r in results for e in r["errors"]})[:3]:
        print(f"     error: {error[:300]}", flush=True)


def memory_layer(report: Report, quick: bool) -> None:
    import tracemalloc

    from tokens import memory

    count = 10_000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(count):
        memory.memory[f"provider-{i:05d}"] = ("x" * 40 + f"{i:08d}", time.time() + 60, i, "Bearer")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for i in range(count):
        memory.memory.pop(f"provider-{i:05d}", None)
    report.add(
        "6. memory layer per provider (48-char tokens, 10,000 entries)",
        f"{used / count:.0f} B",
        "—",
        "—",
        "≤ ~1 KiB",
    )


WEB = r"""
import sys, psutil
import django
django.setup()
from tokens import get_token, memory
count = int(sys.argv[1])
before = psutil.Process().memory_info().rss
for i in range(count):
    get_token(f"rss-{i}", timeout=10)
after = psutil.Process().memory_info().rss
print(len(memory.memory), before, after, flush=True)
"""


def process_memory(report: Report, quick: bool, worker: subprocess.Popen[bytes]) -> None:
    """RSS of a web-like process holding every provider's token in memory, and of the worker."""
    from datetime import timedelta

    import psutil
    from django.utils import timezone

    from tokens import crypto
    from tokens.models import Provider, ProviderState, Token

    count = 1_000 if quick else 10_000
    now = timezone.now()
    providers = Provider.objects.bulk_create(
        [
            Provider(name=f"rss-{i}", kind="static", secret=f"static-token-{i:06d}" + "x" * 30)
            for i in range(count)
        ],
        batch_size=500,
    )
    ProviderState.objects.bulk_create(
        [
            ProviderState(
                provider=p,
                fence=1,
                current_version=1,
                last_refresh_at=now,
                expires_at=now + timedelta(hours=1),
            )
            for p in providers
        ],
        batch_size=500,
    )
    Token.objects.bulk_create(
        [
            Token(
                provider=p,
                version=1,
                value=p.secret,
                fingerprint=crypto.fingerprint(p.secret),
                issued_at=now,
                expires_at=now + timedelta(hours=1),
                refresh_at=now + timedelta(minutes=50),
            )
            for p in providers
        ],
        batch_size=500,
    )
    web = subprocess.run(
        [sys.executable, "-c", WEB, str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    held, before, after = (int(x) for x in web.stdout.split()[-3:])
    report.add(
        f"6. web process RSS with {count:,} providers' tokens in memory",
        f"{after / 2**20:.0f} MiB",
        f"{before / 2**20:.0f} MiB before reading them",
        f"{(after - before) / held:.0f} B per provider",
        "≤ ~1 KiB per provider",
    )
    rss = sum(
        p.memory_info().rss
        for p in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children()]
    )
    report.add(
        "6. worker RSS (main process + 2 prefork children)",
        f"{rss / 2**20:.0f} MiB",
        "—",
        "—",
        "report",
    )


def throughput(report: Report, quick: bool) -> None:
    """Refreshes per second with an instant generator: one task per provider (how readers,
    operators and retries ask), and the schedule's batches of TOKENS_DISPATCH_BATCH."""
    from django.db import connection

    from tokens.conf import tokens_settings
    from tokens.constants import Reason
    from tokens.models import Provider, ProviderState
    from tokens.queue import batch_send, refresh_send

    count = 300 if quick else 2000
    size = int(tokens_settings.DISPATCH_BATCH)
    for label, prefix in (("one task per provider", "tp"), (f"batches of {size}", "tpb")):
        providers = Provider.objects.bulk_create(
            [
                Provider(
                    name=f"{prefix}-{i}",
                    kind="callable",
                    config={"path": "bench.generators.instant"},
                )
                for i in range(count)
            ]
        )
        ProviderState.objects.bulk_create([ProviderState(provider=p) for p in providers])
        ids = [p.pk for p in providers]
        started = time.perf_counter()
        if prefix == "tp":
            for pk in ids:
                refresh_send(provider_id=pk, reason=Reason.MANUAL, after_commit=False)
        else:
            for start in range(0, count, size):
                batch_send(provider_ids=ids[start : start + size], due=None)
        deadline = time.monotonic() + 600
        done = 0
        while time.monotonic() < deadline:
            done = ProviderState.objects.filter(provider_id__in=ids, current_version__gt=0).count()
            if done == count:
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
        report.add(
            f"7. refresh throughput, {connection.vendor}, worker prefork -c 2, {label} "
            f"({count} refreshes)",
            f"{done / elapsed:.0f} refreshes/s",
            f"{done} of {count} done",
            "—",
            "report",
        )


def throughput_endpoint(report: Report, quick: bool) -> None:
    """Figure 7 against the bench's token endpoint answering after 200 ms and after 1 s: one
    task per provider (a prefork process waits out each request: processes / latency at most)
    and the schedule's batches (a batch's requests in flight together)."""
    from django.db import connection

    from bench.endpoint import TokenEndpoint
    from bench.scale import ENDPOINT_PORTS
    from tokens.conf import tokens_settings
    from tokens.constants import Reason
    from tokens.models import Provider, ProviderState
    from tokens.queue import batch_send, refresh_send

    size = int(tokens_settings.DISPATCH_BATCH)
    with TokenEndpoint(ports=ENDPOINT_PORTS) as endpoint:
        for latency in (0.2, 1.0):
            endpoint.set_latency(latency)
            single = max(10, round((10 if quick else 20) * 2 / latency))  # ~10-20 s each way
            batched = 400 if quick else 2000
            for label, prefix, count in (
                ("one task per provider", f"tpe{latency:g}", single),
                (f"batches of {size}", f"tpbe{latency:g}", batched),
            ):
                providers = Provider.objects.bulk_create(
                    [
                        Provider(
                            name=f"{prefix}-{i}",
                            kind="oauth2_client_credentials",
                            config={
                                "token_url": endpoint.urls[i % ENDPOINT_PORTS],
                                "client_id": f"{prefix}-{i}",
                            },
                            secret="bench-secret",
                        )
                        for i in range(count)
                    ]
                )
                ProviderState.objects.bulk_create([ProviderState(provider=p) for p in providers])
                ids = [p.pk for p in providers]
                started = time.perf_counter()
                if label.startswith("one"):
                    for pk in ids:
                        refresh_send(provider_id=pk, reason=Reason.MANUAL, after_commit=False)
                else:
                    for start in range(0, count, size):
                        batch_send(provider_ids=ids[start : start + size], due=None)
                deadline = time.monotonic() + 600
                done = 0
                while time.monotonic() < deadline:
                    done = ProviderState.objects.filter(
                        provider_id__in=ids, current_version__gt=0
                    ).count()
                    if done == count:
                        break
                    time.sleep(0.2)
                elapsed = time.perf_counter() - started
                report.add(
                    f"7. refresh throughput, {connection.vendor}, worker prefork -c 2, {label}, "
                    f"token endpoint answering after {latency * 1000:.0f} ms ({count} refreshes)",
                    f"{done / elapsed:.0f} refreshes/s",
                    f"{done} of {count} done; latency-bound: {2 / latency:.0f}/s",
                    f"{done / elapsed / (2 / latency):.0f}× the latency bound",
                    "batches: not bound by latency",
                )


# ---------------------------------------------------------------------------- main


def large(report: Report, quick: bool, worker: subprocess.Popen[bytes] | None) -> None:
    """Figure 9: 100,000 providers every 10 minutes on PostgreSQL (the schedule against the
    token endpoint at 200 ms), and the operator surfaces at that size."""
    from django.db import connection

    from bench.scale import scale_endpoint

    if connection.vendor != "postgresql" and not quick:
        print("  9. skipped: 100,000 providers are measured on PostgreSQL (DATABASE_URL)")
        return
    assert worker is not None
    count, every = (5_000, 60) if quick else (100_000, 600)
    scale_endpoint(report, worker, count=count, every=every, periods=1, latency=0.2, figure="9")


def large_surfaces(report: Report, quick: bool) -> None:
    """Figure 11: the operator surfaces at 100,000 providers (PostgreSQL)."""
    from django.db import connection

    from bench.large import surfaces
    from bench.scale import fresh_database

    if connection.vendor != "postgresql" and not quick:
        print("  11. skipped: 100,000 providers are measured on PostgreSQL (DATABASE_URL)")
        return
    fresh_database()  # the surfaces make their own mix of 100,000 providers
    surfaces(report, quick)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes")
    parser.add_argument(
        "--figures",
        default="1,2,3,4,5,6,7,8,9,11",
        help="comma-separated figure numbers to measure (default: all)",
    )
    args = parser.parse_args()
    STATE.mkdir(exist_ok=True)
    from project.embedded_redis import EmbeddedRedis

    server = None
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        server = EmbeddedRedis(STATE / "bench-redis")
        redis_url = server.start()
    workdir = Path(tempfile.mkdtemp(prefix="tokens-bench-", dir=STATE))
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{workdir / 'bench.sqlite3'}"
    setup_environment(redis_url, database_url)
    import django
    from django.core.management import call_command

    django.setup()
    from django.db import connection

    if connection.vendor != "sqlite":
        call_command("flush", "--no-input", verbosity=0)
    call_command("migrate", verbosity=0)
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    report = Report()
    print(
        f"tokens benchmarks ({'quick' if args.quick else 'full'}) on {connection.vendor}, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    figures = {int(number) for number in args.figures.split(",")}
    worker = None
    try:
        if 1 in figures:
            warm_read(report, args.quick)
        if 2 in figures:
            freshness(report, args.quick)
        if 6 in figures:
            memory_layer(report, args.quick)
        if figures & {3, 4, 5, 6, 7, 8, 9}:
            worker = start_worker()
        if 3 in figures:
            cold_first_token(report, args.quick)
        if 4 in figures:
            cold_burst(report)
        if 7 in figures:
            throughput(report, args.quick)
            throughput_endpoint(report, args.quick)
        if 6 in figures:
            assert worker is not None
            process_memory(report, args.quick, worker)
        if 8 in figures:  # before figure 5, which empties the database
            from bench.peers import peers

            peers(report, args.quick)
        if 5 in figures:
            from bench.scale import scale, scale_endpoint

            scale(report, args.quick)
            assert worker is not None
            count, every = (1_000, 10) if args.quick else (10_000, 60)
            for latency in (0.2, 1.0):
                scale_endpoint(report, worker, count=count, every=every, periods=2, latency=latency)
        if 9 in figures:
            large(report, args.quick, worker)
        if 11 in figures:
            # No worker meanwhile: refreshes queued by earlier figures would make state rows
            # for the ids the surfaces' providers get.
            if worker is not None:
                processes.stop(worker, timeout=30)
                worker = None
            large_surfaces(report, args.quick)
    finally:
        if worker is not None:
            processes.stop(worker, timeout=30)
        if server is not None:
            server.stop()
    print()
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
