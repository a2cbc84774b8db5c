"""The product end to end: real worker, real beat, real Redis, a real HTTP token endpoint."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
import redis
from django_celery_beat.models import PeriodicTask
from pytest_httpserver import HTTPServer

from tests.factories import make_provider, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.processes import Process, run_script, wait_for
from tokens import ProviderDisabled, get_token
from tokens.models import Provider, ProviderState, Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def endpoint(httpserver: HTTPServer) -> TokenEndpoint:
    return TokenEndpoint(httpserver)


def current_value(provider: Provider) -> str | None:
    version = ProviderState.objects.get(provider=provider).current_version
    token = Token.objects.filter(provider=provider, version=version).first()
    return token.value if token else None


def test_new_provider__gets_its_first_token_at_once_not_an_interval_later(
    worker: Process, endpoint: TokenEndpoint
) -> None:
    provider = make_provider(config=oauth2_config(endpoint.url), interval=600)
    wait_for(lambda: current_value(provider) == "tok-1", 5, message="the first token")
    assert endpoint.calls == 1
    assert get_token("api") == "tok-1"


def test_get_token__in_another_process_blocks_until_the_first_token(
    worker: Process, endpoint: TokenEndpoint
) -> None:
    endpoint.delay = 1.5  # the first token takes a while
    make_provider(config=oauth2_config(endpoint.url), interval=600)
    result = run_script(
        "import time\n"
        "from tokens import get_token\n"
        "started = time.monotonic()\n"
        "token = get_token('api', timeout=20)\n"
        "print(token, round(time.monotonic() - started, 2))\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    token, waited = result.stdout.split()
    assert token == "tok-1"
    assert float(waited) > 0.2  # it waited for the token instead of failing
    assert endpoint.calls == 1


def test_get_token__works_from_a_management_command(
    worker: Process, endpoint: TokenEndpoint
) -> None:
    import subprocess
    import sys

    from tests.processes import ROOT, child_env

    make_provider(config=oauth2_config(endpoint.url), interval=600)
    result = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "from tokens import get_token; print(get_token('api', timeout=20))",
        ],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "tok-1"


def test_beat__brings_a_new_token_every_interval(worker: Process, beat, endpoint) -> None:
    provider = make_provider(config=oauth2_config(endpoint.url), interval=1)
    beat()
    wait_for(lambda: endpoint.calls >= 4, 15, message="four refreshes")
    versions = list(Token.objects.filter(provider=provider).values_list("version", flat=True))
    assert len(versions) >= 3 and versions == sorted(versions, reverse=True)
    wait_for(lambda: get_token("api") == current_value(provider), 5, message="current token")


def test_disabled_provider__stops_refreshing_and_raises(worker: Process, beat, endpoint) -> None:
    provider = make_provider(config=oauth2_config(endpoint.url), interval=1)
    beat()
    wait_for(lambda: endpoint.calls >= 2, 15, message="beat to refresh")
    provider.enabled = False
    provider.save()
    time.sleep(1.5)  # let an in-flight refresh finish
    calls = endpoint.calls
    time.sleep(3)  # three intervals
    assert endpoint.calls == calls
    with pytest.raises(ProviderDisabled):
        get_token("api", timeout=5)


def test_deleted_provider__loses_its_schedule(worker: Process, beat, endpoint) -> None:
    provider = make_provider(config=oauth2_config(endpoint.url), interval=1)
    beat()
    wait_for(lambda: endpoint.calls >= 2, 15, message="beat to refresh")
    provider.delete()
    time.sleep(1.5)
    calls = endpoint.calls
    time.sleep(3)
    assert endpoint.calls == calls


def test_interval_edit__takes_effect_while_beat_runs(worker: Process, beat, endpoint) -> None:
    """As an operator edits it in admin: longer, nothing; shorter, refreshes at that pace."""
    provider = make_provider(config=oauth2_config(endpoint.url), interval=600)
    beat()
    wait_for(lambda: endpoint.calls == 1, 5, message="the first token")
    time.sleep(2)
    assert endpoint.calls == 1  # the next run is ten minutes away
    provider.refresh_interval = timedelta(seconds=1)
    provider.save()
    wait_for(lambda: endpoint.calls >= 3, 15, message="refreshes at the new interval")
    provider.refresh_interval = timedelta(seconds=600)
    provider.save()
    time.sleep(1.5)  # a batch already sent may still run
    calls = endpoint.calls
    time.sleep(3)
    assert endpoint.calls == calls


def test_beat__one_entry_schedules_many_providers_in_batches(
    worker: Process, beat, settings
) -> None:
    """Thirty providers, one beat entry; every one is refreshed by the schedule again."""
    providers = [
        make_provider(
            f"many-{i}", kind="callable", config={"path": "tests.callables.counted"}, interval=2
        )
        for i in range(30)
    ]
    assert PeriodicTask.objects.filter(task__startswith="tokens.").count() == 1
    client = redis.Redis.from_url(settings.REDIS_URL)

    def calls(provider: Provider) -> int:
        return int(client.get(f"test:calls:{provider.name}") or 0)

    wait_for(lambda: all(calls(p) == 1 for p in providers), 10, message="first tokens")
    beat()
    wait_for(lambda: all(calls(p) >= 3 for p in providers), 20, message="scheduled refreshes")


@pytest.mark.parametrize("created_by", ["objects.create", "bulk_create (no signals)"])
def test_cold_provider__20_threads_in_3_processes__one_endpoint_call(
    worker: Process, endpoint: TokenEndpoint, redis_client: redis.Redis, created_by: str
) -> None:
    import subprocess
    import sys

    from tests.processes import ROOT, child_env

    endpoint.delay = 0.5
    callers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.callers", "api", "20", "test:go"],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    if created_by == "objects.create":
        make_provider(config=oauth2_config(endpoint.url), interval=600)
    else:
        Provider.objects.bulk_create(
            [
                Provider(
                    name="api",
                    kind="oauth2_client_credentials",
                    config=oauth2_config(endpoint.url),
                    secret="s3cret",
                )
            ]
        )
    time.sleep(1.5)  # the callers have set Django up and wait for the go
    redis_client.set("test:go", "1")
    outputs = [caller.communicate(timeout=60) for caller in callers]
    for caller, (stdout, stderr) in zip(callers, outputs, strict=True):
        assert caller.returncode == 0, stderr[-2000:]
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["errors"] == []
        assert report["results"] == ["tok-1"] * 20
    assert endpoint.calls == 1


def test_failing_endpoint__last_good_token_keeps_being_served(
    worker: Process, beat, endpoint
) -> None:
    provider = make_provider(config=oauth2_config(endpoint.url), interval=1)
    wait_for(lambda: current_value(provider) == "tok-1", 5, message="the first token")
    endpoint.fail_with = (500, '{"error": "server_error"}', "application/json")
    beat()
    wait_for(
        lambda: ProviderState.objects.get(provider=provider).consecutive_failures >= 2,
        20,
        message="refreshes to fail",
    )
    for _ in range(10):
        assert get_token("api", timeout=1) == "tok-1"
        time.sleep(0.1)
    state = ProviderState.objects.get(provider=provider)
    assert "server_error" in state.last_error
    endpoint.fail_with = None
    wait_for(lambda: get_token("api") not in ("tok-1",), 20, message="recovery")
    assert ProviderState.objects.get(provider=provider).consecutive_failures == 0
