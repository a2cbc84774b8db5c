"""Figure 8: tokens beside its peers, on the same local OAuth2 endpoint, in the same run.

The systems, each as an application would use it, each on a port of its own of one token
endpoint (bench.endpoint: client credentials, answering after LATENCY, 0.2 s):

- **tokens**: an ``oauth2_client_credentials`` provider, a worker (started by bench) and beat
  (started here for the steady minute); callers use ``get_token(name, timeout=...)``.
- **httpx-auth** ``OAuth2ClientCredentials``: one auth object per process; its token cache is
  process-wide (``httpx_auth._oauth2.common.OAuth2.token_cache``). Getting a token is running its
  auth flow on a request up to the point where httpx would send it.
- **authlib** ``OAuth2Client(grant_type="client_credentials")`` (httpx flavour): one client per
  process shared by its threads; ``fetch_token()`` first, then ``ensure_active_token()``.
- **django-cache**: the hand-written pattern: ``cache.get``; on a miss, POST with httpx and
  ``cache.set`` for ``expires_in - 30`` (10 % less for short lifetimes); no lock. Django's
  built-in RedisCache on the bench's Redis, one httpx.Client per process.

Peers keep their defaults except their early-expiry margins (httpx-auth's ``early_expiry``,
30 s; authlib's ``leeway``, 60 s), capped at 10 % of the lifetime: on the short lifetimes used
here their defaults would make every call a token request. Callers are separate processes
(``python -m bench.peers SYSTEM URL``), 4 per system, kept from phase to phase, each warmed up
as a running web process is (Django, database, Redis and tokens' listener opened, no token of
the measured provider read), released together by a Redis "go" key.

The figures, each one row per system; tokens' row has its ratio to the best (lowest) peer:

1. **Warm cost per call** (µs): in the bench process, the token already held; median of
   batches. tokens: a dict lookup and a clock read; authlib: an expiry check on its token dict;
   httpx-auth: a lock, datetime arithmetic and setting the header on a request; django-cache: a
   Redis round trip.
2. **Cold burst** (4 processes x 25 threads, one system at a time, nothing cached): token
   requests the endpoint saw, and p99 of each caller's time to its token. tokens' time is its
   cold path (a refresh queued once for the fleet, the broker hop, the worker's request, store,
   notification) with 100 threads reading the database and Redis at once; the peers' is the
   endpoint's answer, or a queue of them: httpx-auth holds one process-wide lock around token
   requests and does not look again once it has it, so its 25 threads fetch one after the
   other.
3. **Steady minute** (all systems at once, 4 processes x 4 threads calling every 10 ms, tokens
   living 20 s, 12 s with --quick, which measures 15 s): token requests per minute at the
   endpoint, and expired tokens handed out (a token returned at time t whose encoded expiry is
   ≤ t; those with under 1 s left are shown beside). A peer asks once per thread each time its
   token falls within its margin (every thread that finds it so fetches its own); tokens once
   per refresh, which its schedule makes refresh_lead() before expiry (for short lifetimes
   about 70 % into them).
4. **Outage**, after the steady period, on each system's port when the token it holds is half
   a lifetime old (so that every system meets it at the same point of its token's life): every
   answer a 503 for one lifetime, then a tail (10 s; 8 s with --quick). Errors raised to
   callers (their number follows how fast a call fails: a peer's failing call waits for the
   endpoint's answer, tokens fails fast), seconds a caller had no valid token (with how long the
   token held at the start had left), expired tokens handed out, endpoint requests during the
   outage, and the time from the port healing to every caller having a valid token.

What limits it: two cores shared by the endpoint, the worker, beat, 16 caller processes and
whatever else runs; timings move between runs, counts much less. One outage per system at one
point of a token's life, not an average over points. Quick runs extrapolate requests per minute
from 15 s.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from project import processes

if TYPE_CHECKING:
    from bench.__main__ import Report
    from bench.endpoint import TokenEndpoint

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("tokens", "httpx-auth", "authlib", "django-cache")
PEERS = SYSTEMS[1:]
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret"
LATENCY = 0.2  # the endpoint's answer time: long enough for races to show
MARGIN = 0.1  # peers' early-expiry margins: their defaults, capped at this part of the lifetime
TOKENS_TIMEOUT = 5.0  # get_token(timeout=...) in the steady loop (a web request's patience)
BURST = (4, 25)  # cold burst: processes x threads
STEADY = (4, 4)  # steady minute: the same processes x threads
PAUSE = 0.01  # between a steady caller's calls: the rest of its request's handling
WARMUP = "peer-warmup"  # tokens' provider that callers read once before they are "ready"


# ---------------------------------------------------------------------------- one token, per system


def getter(
    system: str, *, url: str, name: str, lifetime: float
) -> tuple[Callable[[], str], Callable[[], object]]:
    """``system``'s way to get the current access token, as an application would write it (one
    per process, shared by its threads), and a warm-up that opens what a running web process
    has open already (database, Redis, tokens' notification listener) without reading or
    caching any token of ``name``."""
    if system == "tokens":
        from tokens import get_token

        return (
            lambda: get_token(name, timeout=TOKENS_TIMEOUT),
            lambda: get_token(WARMUP, timeout=10),  # another provider, already warm
        )
    if system == "httpx-auth":
        import httpx
        import httpx_auth

        # Tokens live in httpx_auth's process-wide OAuth2.token_cache, keyed by a hash of the
        # URL and the credentials: every auth object of this provider in the process shares it.
        # Each token request opens an httpx.Client of its own (the library's default).
        # A client id per provider name, so that each phase starts with nothing cached.
        auth = httpx_auth.OAuth2ClientCredentials(
            url, f"{CLIENT_ID}-{name}", CLIENT_SECRET, early_expiry=min(30.0, MARGIN * lifetime)
        )
        local = threading.local()

        def from_httpx_auth() -> str:
            # An httpx.Auth flow sets the header and yields the request for httpx to send: the
            # token request (when one is needed) happens before the yield; the API request is
            # never sent here.
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = httpx.Request("GET", "https://api.invalid/")
            next(auth.auth_flow(request))
            return str(request.headers["Authorization"]).removeprefix("Bearer ")

        return from_httpx_auth, lambda: None
    if system == "authlib":
        with warnings.catch_warnings():  # this authlib warns that it prefers httpx2 to httpx
            warnings.simplefilter("ignore")
            from authlib.integrations.httpx_client import OAuth2Client

        client = OAuth2Client(
            CLIENT_ID,
            CLIENT_SECRET,
            token_endpoint=url,
            grant_type="client_credentials",
            leeway=min(60.0, MARGIN * lifetime),
        )

        def from_authlib() -> str:
            # What OAuth2Client.request() does before it signs a request: no token yet is
            # MissingTokenError there (the docs fetch one first); then ensure_active_token()
            # fetches a new one when it is within the leeway of its expiry.
            if not client.token:
                client.fetch_token()
            else:
                client.ensure_active_token(client.token)
            return str(client.token["access_token"])

        return from_authlib, lambda: None
    if system == "django-cache":
        import httpx
        from django.core.cache.backends.redis import RedisCache

        cache = RedisCache(os.environ["REDIS_URL"], {})
        key = f"bench-peer-token:{name}"
        # One client per process, as a team keeps a requests.Session: httpx.post() would build
        # an SSL context per call (about 20 ms of CPU here), which is httpx's cost, not the
        # pattern's.
        session = httpx.Client(timeout=10)

        def from_django_cache() -> str:
            token = cache.get(key)
            if token is None:
                response = session.post(
                    url, data={"grant_type": "client_credentials"}, auth=(CLIENT_ID, CLIENT_SECRET)
                )
                response.raise_for_status()
                payload = response.json()
                token = payload["access_token"]
                expires_in = int(payload.get("expires_in", 3600))
                cache.set(key, token, expires_in - 30 if expires_in > 300 else expires_in * 0.9)
            return str(token)

        return from_django_cache, lambda: cache.get("bench-peer-warmup")
    raise ValueError(system)


# ---------------------------------------------------------------------------- caller processes


def caller(argv: list[str]) -> int:
    """``python -m bench.peers SYSTEM URL``: one process of an application using SYSTEM.

    Sets Django up, prints "started", then runs the phases it reads from stdin, one JSON
    object a line: ``{"mode", "name", "threads", "lifetime", "go", "stop", "seconds"}``. For
    each: builds SYSTEM's getter for the provider ``name``, starts the threads, prints "ready",
    waits for the Redis key ``go``, releases the threads together, and prints one JSON line.
    "burst": each thread asks once: its duration or its error. "steady": each thread asks in a
    loop (PAUSE apart) until the Redis key ``stop`` exists (at most ``seconds``), and reports
    the times of its errors, of expired and nearly expired tokens (under 1 s left) handed out,
    of every change between "ok", "expired" and "error", of every new token (with its expiry),
    and its calls per tenth of a second."""
    system, url = argv
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    print("started", flush=True)
    for line in sys.stdin:
        phase = json.loads(line)
        get, warm_up = getter(system, url=url, name=phase["name"], lifetime=phase["lifetime"])
        warm_up()
        results: list[dict[str, Any]] = []
        barrier = threading.Barrier(phase["threads"] + 1)
        stop = threading.Event()
        target: Callable[..., None] = burst_thread
        args: tuple[Any, ...] = (get, barrier, results)
        if phase["mode"] == "steady":
            target, args = steady_thread, (get, barrier, results, stop)
        workers = [threading.Thread(target=target, args=args) for _ in range(phase["threads"])]
        for worker in workers:
            worker.start()
        print("ready", flush=True)
        while not client.exists(phase["go"]):
            time.sleep(0.005)
        barrier.wait()
        if phase["mode"] == "steady":
            deadline = time.monotonic() + phase["seconds"]  # in case the stop never comes
            while not client.exists(phase["stop"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            stop.set()
        for worker in workers:
            worker.join()
        print(json.dumps(results), flush=True)
    return 0


def burst_thread(
    get: Callable[[], str], barrier: threading.Barrier, results: list[dict[str, Any]]
) -> None:
    barrier.wait()
    started = time.perf_counter()
    try:
        get()
        results.append({"duration": time.perf_counter() - started})
    except Exception as error:
        results.append({"error": repr(error)[:300]})


def steady_thread(
    get: Callable[[], str],
    barrier: threading.Barrier,
    results: list[dict[str, Any]],
    stop: threading.Event,
) -> None:
    from bench.endpoint import token_expiry

    mine: dict[str, Any] = {
        "calls": {},
        "errors": [],
        "expired": [],
        "near": [],
        "changes": [],
        "tokens": [],
    }
    results.append(mine)
    barrier.wait()
    last, held = None, None
    while True:
        try:
            token = get()
            now = time.time()
            if token != held:
                mine["tokens"].append((now, token_expiry(token)))
                held = token
            left = token_expiry(token) - now
            status = "ok" if left > 0 else "expired"
            if left <= 0:
                mine["expired"].append(now)
            elif left < 1:
                mine["near"].append(now)
        except Exception as error:
            now = time.time()
            status = "error"
            mine["errors"].append((now, type(error).__name__))
        tenth = int(now * 10)
        mine["calls"][tenth] = mine["calls"].get(tenth, 0) + 1
        if status != last:
            mine["changes"].append((now, status))
            last = status
        if stop.is_set():
            return
        time.sleep(PAUSE)


class Callers:
    """The processes of one system's application, kept from phase to phase."""

    def __init__(self, system: str, url: str, count: int) -> None:
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "bench.peers", system, url],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]

    def prepare(self, **phase: Any) -> None:
        """Send a phase; its threads wait for ``phase["go"]``."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(json.dumps(phase) + "\n")
            process.stdin.flush()

    def started(self) -> None:
        """Wait until every process has set Django up."""
        self._expect("started")

    def ready(self) -> None:
        """Wait until every process's threads wait for the go."""
        self._expect("ready")

    def _expect(self, word: str) -> None:
        for process in self.processes:
            line = self._line(process, 120)
            if line != word:
                raise RuntimeError(f"a peers caller is not {word} (it said {line[:200]!r})")

    def results(self, timeout: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for process in self.processes:
            out += json.loads(self._line(process, timeout))
        return out

    @staticmethod
    def _line(process: subprocess.Popen[str], timeout: float) -> str:
        """The process's next line; a process silent for ``timeout`` seconds is killed."""
        assert process.stdout is not None
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            return process.stdout.readline().strip()
        finally:
            watchdog.cancel()

    def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


# ---------------------------------------------------------------------------- measurements


def per_call(function: Callable[[], object], seconds: float, repeat: int) -> float:
    """Median seconds per call over ``repeat`` batches of about ``seconds`` each (bench's
    ``per_call``, with the batch size found by timing 100 calls first)."""
    from bench.__main__ import per_call as timed

    started = time.perf_counter()
    for _ in range(100):
        function()
    number = max(100, int(seconds / max((time.perf_counter() - started) / 100, 1e-9)))
    return timed(function, number, repeat)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tokens_provider(name: str, url: str, *, cold: bool) -> None:
    """tokens' provider on ``url``: saved as admin saves it (its first token is fetched on
    commit), or ``cold`` (bulk_create with the state row a save makes: nothing fetched yet)."""
    from tokens.models import Provider, ProviderState

    fields = {
        "name": name,
        "kind": "oauth2_client_credentials",
        "config": {"token_url": url, "client_id": CLIENT_ID},
        "secret": CLIENT_SECRET,
        "refresh_interval": timedelta(hours=1),  # the schedule follows the token's expiry
    }
    if cold:
        (provider,) = Provider.objects.bulk_create([Provider(**fields)])
        ProviderState.objects.bulk_create([ProviderState(provider=provider)])
    else:
        Provider.objects.create(**fields)


def providers_delete(*names: str) -> None:
    from tokens.models import Provider

    for provider in Provider.objects.filter(name__in=names):
        provider.delete()  # as admin deletes: its schedule goes with it


def warm(urls: dict[str, str], quick: bool) -> dict[str, float]:
    """Seconds per call in this process, token already held."""
    from tokens import get_token

    tokens_provider("peer-warm", urls["tokens"], cold=False)
    get_token("peer-warm", timeout=10)
    costs = {}
    for system in SYSTEMS:
        if system == "tokens":
            function: Callable[[], str] = lambda: get_token("peer-warm")  # noqa: E731
        else:
            function, _ = getter(system, url=urls[system], name="peer-warm", lifetime=3600)
        function()  # the first token
        costs[system] = per_call(function, 0.05 if quick else 0.2, 5 if quick else 9)
    providers_delete("peer-warm")
    return costs


def cold_burst(
    endpoint: TokenEndpoint, urls: dict[str, str], callers: dict[str, Callers]
) -> dict[str, dict[str, Any]]:
    """Each system in turn: its callers' threads ask at once, with nothing cached."""
    import redis

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    tokens_provider("peer-burst", urls["tokens"], cold=True)
    outcome: dict[str, dict[str, Any]] = {}
    for system in SYSTEMS:  # one at a time, the others' processes idle
        go = f"bench:peers:go:burst:{system}"
        client.delete(go)
        callers[system].prepare(
            mode="burst", name="peer-burst", threads=BURST[1], lifetime=3600, go=go
        )
        callers[system].ready()
        endpoint.reset()
        client.set(go, 1)
        results = callers[system].results(timeout=120)
        time.sleep(0.5)  # a late duplicate request would still count
        outcome[system] = {
            "requests": endpoint.requests(urls[system]),
            "durations": [r["duration"] for r in results if "duration" in r],
            "errors": [r["error"] for r in results if "error" in r],
            "in_flight_max": endpoint.in_flight_max(),
        }
    providers_delete("peer-burst")
    return outcome


def steady_and_outage(
    endpoint: TokenEndpoint,
    urls: dict[str, str],
    callers: dict[str, Callers],
    quick: bool,
    lifetime: float,
) -> dict[str, dict[str, Any]]:
    """All systems at once, each on its own port: a warm-up, a steady period, then for each
    system an outage of one lifetime (every answer on its port a 503) that starts when its
    token is half a lifetime old, and a tail after its port heals."""
    import redis
    from django_celery_beat.models import PeriodicTask

    from bench.scale import start_beat
    from tokens.constants import DISPATCH_ENTRY

    warmup, steady, tail = (3.0, 15.0, 8.0) if quick else (5.0, 60.0, 10.0)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    go_key, stop_key = "bench:peers:go:steady", "bench:peers:stop:steady"
    client.delete(go_key, stop_key)
    endpoint.set_lifetime(lifetime)
    # tokens' design includes beat (its schedule refreshes before expiry); figure 5's baseline
    # disables the dispatcher entry.
    PeriodicTask.objects.filter(name=DISPATCH_ENTRY).update(enabled=True)
    beat = start_beat("peers-beat")
    marks: dict[str, dict[str, float]] = {system: {} for system in SYSTEMS}
    counts: dict[str, dict[str, int]] = {system: {} for system in SYSTEMS}

    def mark(label: str, *systems: str) -> None:
        now = time.time()
        for system in systems or SYSTEMS:
            marks[system][label] = now
            counts[system][label] = endpoint.requests(urls[system])

    try:
        for group in callers.values():
            group.prepare(
                mode="steady",
                name="peer-steady",
                threads=STEADY[1],
                lifetime=lifetime,
                go=go_key,
                stop=stop_key,
                seconds=warmup + steady + 3 * lifetime + tail + 60,
            )
        for group in callers.values():
            group.ready()
        # Saved as the callers start: tokens' first token comes with the peers' first ones.
        tokens_provider("peer-steady", urls["tokens"], cold=False)
        go = time.time()
        client.set(go_key, go)
        endpoint.reset()
        time.sleep(max(0.0, go + warmup - time.time()))
        mark("steady")
        time.sleep(max(0.0, go + warmup + steady - time.time()))
        mark("steady_end")
        # Each system's outage starts when the token it holds is half a lifetime old (by the
        # time its port issued it), so that every system meets it at the same point of its
        # token's life; after one lifetime of 503s its port heals.
        age, started = lifetime / 2, time.time()
        while any("settled" not in marks[system] for system in SYSTEMS):
            now = time.time()
            for system, url in urls.items():
                mine = marks[system]
                if "outage" not in mine:
                    held = now - endpoint.issued_at(url)
                    if age <= held < age + 0.25 or (held >= age and now > started + lifetime):
                        endpoint.set_failing(True, url)
                        mark("outage", system)
                elif "healed" not in mine and now >= mine["outage"] + lifetime:
                    endpoint.set_failing(False, url)
                    mark("healed", system)
                elif "healed" in mine and "settled" not in mine and now >= mine["healed"] + tail:
                    mark("settled", system)
            time.sleep(0.01)
        client.set(stop_key, 1)
        results = {system: group.results(timeout=120) for system, group in callers.items()}
    finally:
        endpoint.set_failing(False)
        processes.stop(beat, timeout=30)
    providers_delete("peer-steady")
    return {system: analyse(results[system], marks[system], counts[system]) for system in SYSTEMS}


def analyse(
    threads: list[dict[str, Any]], marks: dict[str, float], counts: dict[str, int]
) -> dict[str, Any]:
    """One system's steady period and outage, from its callers' records and its port's counts."""
    steady, steady_end = marks["steady"], marks["steady_end"]
    outage, healed, end = marks["outage"], marks["healed"], marks["settled"]

    def inside(times: list[float], start: float, stop: float) -> int:
        return sum(1 for t in times if start <= t < stop)

    errors = [t for thread in threads for t, _ in thread["errors"]]
    expired = [t for thread in threads for t in thread["expired"]]
    near = [t for thread in threads for t in thread["near"]]
    kinds = sorted({kind for thread in threads for _, kind in thread["errors"]})
    recovery, without, left = [], [], []
    for thread in threads:
        held = [expiry for t, expiry in thread["tokens"] if t < outage]
        if held:
            left.append(held[-1] - outage)
        changes = thread["changes"]
        before = [status for t, status in changes if t < healed]
        if before and before[-1] == "ok":
            recovery.append(0.0)
        else:
            back = [t for t, status in changes if t >= healed and status == "ok"]
            recovery.append(back[0] - healed if back else math.inf)
        # seconds without a valid token from the outage's start to the end of its tail
        then = next((status for t, status in reversed(changes) if t < outage), "ok")
        since = outage if then != "ok" else None
        lost = 0.0
        for t, status in changes:
            if not outage <= t < end:
                continue
            if status != "ok" and since is None:
                since = t
            elif status == "ok" and since is not None:
                lost += t - since
                since = None
        if since is not None:
            lost += end - since
        without.append(lost)
    return {
        "per_minute": (counts["steady_end"] - counts["steady"]) / (steady_end - steady) * 60,
        "steady_requests": counts["steady_end"] - counts["steady"],
        "steady_seconds": steady_end - steady,
        "steady_expired": inside(expired, steady, steady_end),
        "steady_near": inside(near, steady, steady_end),
        "steady_errors": inside(errors, steady, steady_end),
        "outage_calls": sum(
            n
            for thread in threads
            for tenth, n in thread["calls"].items()
            if outage <= int(tenth) / 10 < end
        ),
        "outage_errors": inside(errors, outage, end),
        "outage_expired": inside(expired, outage, end),
        "outage_near": inside(near, outage, end),
        "outage_requests": counts["healed"] - counts["outage"],
        "outage_seconds": healed - outage,
        "tail_requests": counts["settled"] - counts["healed"],
        "tail_seconds": end - healed,
        "recovery_max": max(recovery),
        "recovery_p50": statistics.median(recovery),
        "without_p50": statistics.median(without),
        "without_max": max(without),
        "left_p50": statistics.median(left) if left else math.nan,
        "error_kinds": kinds,
    }


# ---------------------------------------------------------------------------- the figure


def compare(
    report: Report,
    figure: str,
    values: dict[str, float],
    show: Callable[[float], str],
    target: str,
    detail: dict[str, str] | None = None,
) -> None:
    """One row per system; tokens' row carries its ratio to the best (lowest) peer."""
    best = min(PEERS, key=lambda system: values[system])
    mine, theirs = values["tokens"], values[best]
    if mine == theirs:
        ratio = f"= best peer ({best})"
    elif theirs == 0 or math.isinf(theirs) or math.isinf(mine):
        ratio = f"best peer ({best}): {show(theirs)}"
    else:
        ratio = f"{mine / theirs:.2g}× best peer ({best})"
    for system in SYSTEMS:
        report.add(
            f"8. {figure}: {system}",
            show(values[system]),
            (detail or {}).get(system, "—"),
            ratio if system == "tokens" else "—",
            target if system == "tokens" else "(peer)",
        )


def peers(report: Report, quick: bool) -> None:
    """Figure 8: tokens, httpx-auth, authlib and the hand-written Django cache pattern on one
    local token endpoint (bench.endpoint), each on a port of its own."""
    from bench.endpoint import TokenEndpoint
    from tokens import get_token
    from tokens.models import refresh_lead

    lifetime = 12.0 if quick else 20.0
    with TokenEndpoint(latency=LATENCY, ports=len(SYSTEMS), lifetime=3600) as endpoint:
        urls = dict(zip(SYSTEMS, endpoint.urls, strict=True))
        tokens_provider(WARMUP, urls["tokens"], cold=False)
        get_token(WARMUP, timeout=10)
        compare(
            report,
            "warm cost per call (token held, this process)",
            warm(urls, quick),
            lambda s: f"{s * 1e6:.2f} µs",
            "≤ best peer",
        )
        callers = {system: Callers(system, urls[system], BURST[0]) for system in SYSTEMS}
        try:
            for group in callers.values():
                group.started()
            burst = cold_burst(endpoint, urls, callers)
            count = BURST[0] * BURST[1]
            compare(
                report,
                f"cold burst {BURST[0]}×{BURST[1]}, {LATENCY:g} s endpoint: token requests",
                {s: burst[s]["requests"] for s in SYSTEMS},
                lambda v: f"{v:.0f}",
                "1",
                {
                    s: f"{len(burst[s]['durations'])} of {count} got a token, "
                    f"{len(burst[s]['errors'])} errors; at most {burst[s]['in_flight_max']} "
                    "requests at once at the endpoint"
                    for s in SYSTEMS
                },
            )
            compare(
                report,
                f"cold burst {BURST[0]}×{BURST[1]}: p99 time-to-token",
                {s: percentile(burst[s]["durations"], 99) for s in SYSTEMS},
                lambda v: f"{v * 1e3:.0f} ms",
                "report",
                {s: f"p50 {percentile(burst[s]['durations'], 50) * 1e3:.0f} ms" for s in SYSTEMS},
            )
            for system in SYSTEMS:
                for error in sorted(set(burst[system]["errors"]))[:2]:
                    print(f"     {system} error: {error}", flush=True)
            steady = steady_and_outage(endpoint, urls, callers, quick, lifetime)
        finally:
            for group in callers.values():
                group.close()
    providers_delete(WARMUP)
    shape = f"{STEADY[0]}×{STEADY[1]} callers, lifetime {lifetime:g} s"
    # tokens' schedule refreshes a token refresh_lead() before its expiry (margin with jitter,
    # expiry skew, one dispatch period): one request per (lifetime - lead).
    expected = 60 / (lifetime - refresh_lead(timedelta(seconds=lifetime)).total_seconds())
    compare(
        report,
        f"steady ({shape}): token requests per minute",
        {s: steady[s]["per_minute"] for s in SYSTEMS},
        lambda v: f"{v:.1f}/min",
        f"≈ {expected:.1f}/min (one per refresh)",
        {
            s: f"{steady[s]['steady_requests']} in {steady[s]['steady_seconds']:.0f} s, "
            f"{steady[s]['steady_errors']} errors"
            for s in SYSTEMS
        },
    )
    compare(
        report,
        f"steady ({shape}): expired tokens handed out",
        {s: steady[s]["steady_expired"] for s in SYSTEMS},
        lambda v: f"{v:.0f}",
        "0",
        {s: f"{steady[s]['steady_near']} with under 1 s left" for s in SYSTEMS},
    )
    outage = f"outage of one lifetime ({lifetime:g} s of 503s from a token's half-life)"
    compare(
        report,
        f"{outage}: errors raised to callers",
        {s: steady[s]["outage_errors"] for s in SYSTEMS},
        lambda v: f"{v:.0f}",
        "report",
        {
            s: f"in {steady[s]['outage_calls']} calls; "
            + (", ".join(steady[s]["error_kinds"]) or "no errors")
            for s in SYSTEMS
        },
    )
    compare(
        report,
        f"{outage}: seconds a caller had no valid token (p50 of callers)",
        {s: steady[s]["without_p50"] for s in SYSTEMS},
        lambda v: f"{v:.1f} s",
        f"≤ {lifetime:g} s",
        {
            s: f"max {steady[s]['without_max']:.1f} s; the token held when it began had "
            f"{steady[s]['left_p50']:.1f} s left"
            for s in SYSTEMS
        },
    )
    compare(
        report,
        f"{outage}: expired tokens handed out",
        {s: steady[s]["outage_expired"] for s in SYSTEMS},
        lambda v: f"{v:.0f}",
        "0",
        {s: f"{steady[s]['outage_near']} with under 1 s left" for s in SYSTEMS},
    )
    compare(
        report,
        f"{outage}: endpoint requests during it",
        {s: steady[s]["outage_requests"] for s in SYSTEMS},
        lambda v: f"{v:.0f}",
        "≤ 1 per second",
        {s: f"{steady[s]['outage_requests'] / steady[s]['outage_seconds']:.1f}/s" for s in SYSTEMS},
    )
    compare(
        report,
        f"{outage}: healed → every caller has a valid token",
        {s: steady[s]["recovery_max"] for s in SYSTEMS},
        lambda v: "never" if math.isinf(v) else f"{v:.2f} s",
        "≤ 5 s",
        {
            s: f"p50 {steady[s]['recovery_p50']:.2f} s; {steady[s]['tail_requests']} requests "
            f"in the {steady[s]['tail_seconds']:.0f} s after"
            for s in SYSTEMS
        },
    )


if __name__ == "__main__":
    sys.exit(caller(sys.argv[1:]))
