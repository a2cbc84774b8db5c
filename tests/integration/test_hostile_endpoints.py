"""Hostile token endpoints against real workers and beat: they may cost their own deadline, never
another provider's first token, a worker process, or a burst of endpoint calls."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from django.contrib.auth.models import Permission, User
from django.test import Client
from pytest_httpserver import HTTPServer

from tests.factories import make_provider, oauth2_config
from tests.hostile import HostileEndpoint, respond, token_body, trickle
from tests.integration.endpoint import TokenEndpoint
from tests.processes import ROOT, Process, purge_queues, start_worker, wait_for
from tokens import TokenUnavailable, get_token
from tokens.models import ProviderState, Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HTTP_TIMEOUT = 2.0


def procfile_worker(name: str) -> dict[str, str]:
    """The queues, concurrency and pool a Procfile worker line runs with."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        process, _, command = line.partition(":")
        if process.strip() == name:
            argv = shlex.split(command)
            options = dict(
                arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg
            )
            return {
                "queues": options["queues"],
                "concurrency": options.get("concurrency", "2"),
                "pool": options.get("pool", "prefork"),
            }
    raise AssertionError(f"no {name} in the Procfile")


@pytest.fixture
def lanes(tmp_path: Path, django_db_setup: None) -> Iterator[list[Process]]:
    """The two workers as the Procfile runs them (its queues, concurrency and pool)."""
    purge_queues()
    started = []
    for name in ("worker", "urgent"):
        options = procfile_worker(name)
        started.append(
            start_worker(
                tmp_path,
                hostname=name,
                queues=options["queues"],
                concurrency=int(options["concurrency"]),
                pool=options["pool"],
                TOKENS_HTTP_TIMEOUT=str(HTTP_TIMEOUT),
            )
        )
    yield started
    for process in started:
        process.stop()


def refresher() -> User:
    user = User.objects.create_user("refresher", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_provider", "refresh_provider"])
    )
    return user


def test_no_starvation__a_new_provider_gets_its_first_token_while_endpoints_hang(
    lanes: list[Process], beat, httpserver: HTTPServer
) -> None:
    """Four endpoints trickle a byte every 0.3 s (each refresh costs its whole deadline, and they
    fall due every second) and an operator posts "Refresh now" for them twenty times; the
    workers run as in the Procfile (two of each). A provider added meanwhile gets its first token
    within 2 x TOKENS_HTTP_TIMEOUT, and the dispatcher keeps running (none of its messages
    expires)."""
    hanging = [HostileEndpoint(trickle(0.3, total=30)) for _ in range(4)]
    try:
        providers = [
            make_provider(f"slow-{i}", config=oauth2_config(endpoint.url), interval=1)
            for i, endpoint in enumerate(hanging)
        ]
        beat_process: Process = beat()
        wait_for(
            lambda: all(
                ProviderState.objects.get(provider=p).consecutive_failures >= 1 for p in providers
            ),
            30,
            message="every hanging provider to have failed once",
        )
        time.sleep(HTTP_TIMEOUT)  # the scheduled lane is busy with their batches and retries
        # An operator (or a script with the refresh permission) keeps asking for refreshes of
        # the hanging ones: each is asked for at most once per deadline, on the scheduled lane.
        operator = Client()
        operator.force_login(refresher())
        for i in range(20):
            operator.post(f"/admin/tokens/provider/{providers[i % 2].pk}/refresh/")
        healthy = TokenEndpoint(httpserver)
        started = time.monotonic()
        provider = make_provider("healthy", config=oauth2_config(healthy.url))
        wait_for(
            lambda: Token.objects.filter(provider=provider).exists(),
            4 * HTTP_TIMEOUT,
            message="the healthy provider's first token",
        )
        waited = time.monotonic() - started
        assert waited < 2 * HTTP_TIMEOUT, waited
        assert get_token("healthy") == "tok-1"
        # The dispatcher ran throughout on the urgent lane: none of its messages expired.
        urgent_log = lanes[1].log()
        assert "tokens.dispatch_due" in urgent_log
        assert not [
            line
            for line in urgent_log.splitlines()
            if "dispatch_due" in line and ("revoked" in line or "expired" in line.lower())
        ]
        assert beat_process.alive()
        # And each hanging endpoint cost its own deadline: every failure says so.
        for p in providers:
            assert "did not answer within 2s" in ProviderState.objects.get(provider=p).last_error
    finally:
        for endpoint in hanging:
            endpoint.close()


@pytest.fixture
def prefork_worker(tmp_path: Path, django_db_setup: None) -> Iterator[Process]:
    purge_queues()
    process = start_worker(
        tmp_path,
        hostname="prefork",
        pool="prefork",
        concurrency=1,
        CELERY_TASK_SOFT_TIME_LIMIT="2",
        CELERY_TASK_TIME_LIMIT="6",
    )
    yield process
    process.stop()


def pool_pids(worker: Process) -> set[int]:
    return {child.pid for child in psutil.Process(worker.pid).children()}


@pytest.fixture
def short_time_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time limits travel in the message, from the sender's configuration: this process's."""
    from tokens.tasks import refresh_token

    monkeypatch.setattr(refresh_token, "soft_time_limit", 2)
    monkeypatch.setattr(refresh_token, "time_limit", 6)
    monkeypatch.setattr(refresh_token, "_exec_options", None)


def test_time_limit__is_neither_a_generator_error_nor_retried_at_once(
    prefork_worker: Process, redis_client: redis.Redis, short_time_limits: None
) -> None:
    """A callable that hangs is stopped by the task's soft time limit (2 s here). That is the
    task's limit, not the generator's error: the provider records it as such and waits at least
    as long as the call ran before the next attempt."""
    redis_client.set("test:sleep:stuck", "30")
    provider = make_provider("stuck", kind="callable", config={"path": "tests.callables.sleeps"})
    state = wait_for(
        lambda: ProviderState.objects.filter(
            provider=provider, consecutive_failures__gte=1
        ).first(),
        20,
        message="the refresh to be stopped",
    )
    assert isinstance(state, ProviderState)
    assert "refresh stopped by the task's time limit after 2s" in state.last_error
    assert "SoftTimeLimitExceeded" not in state.last_error
    assert state.next_attempt_at is not None and state.last_attempt_at is not None
    assert (state.next_attempt_at - state.last_attempt_at).total_seconds() >= 2
    calls = int(redis_client.get("test:calls:stuck") or 0)
    time.sleep(2)
    assert int(redis_client.get("test:calls:stuck") or 0) - calls <= 1
    assert prefork_worker.alive()


def test_system_exit_in_a_generator__takes_no_worker_process_down(
    prefork_worker: Process, beat
) -> None:
    children = pool_pids(prefork_worker)
    provider = make_provider(
        "quitter", kind="callable", config={"path": "tests.callables.exits"}, interval=1
    )
    beat()
    wait_for(
        lambda: ProviderState.objects.filter(
            provider=provider, consecutive_failures__gte=3
        ).exists(),
        20,
        message="three refreshes of the exiting generator",
    )
    state = ProviderState.objects.get(provider=provider)
    assert state.permanent_error and "raised SystemExit" in state.last_error
    assert pool_pids(prefork_worker) == children  # the same pool process ran them all
    assert prefork_worker.alive()


def test_a_lifetime_below_the_floor__one_endpoint_call_not_a_burst(
    worker: Process, settings
) -> None:
    """An endpoint answering expires_in 0.001: the token is refused (a permanent error), and 20
    get_token() calls cost one endpoint call, not one each."""
    with HostileEndpoint(respond(body=token_body(expires_in=0.001))) as endpoint:
        make_provider("blink", config=oauth2_config(endpoint.url))
        wait_for(
            lambda: ProviderState.objects.filter(
                provider__name="blink", consecutive_failures__gte=1
            ).exists(),
            10,
            message="the refused token",
        )
        for _ in range(20):
            with pytest.raises(TokenUnavailable, match="less than TOKENS_MIN_LIFETIME"):
                get_token("blink", timeout=0.2)
        time.sleep(1)
        assert len(endpoint.requests) == 1
