"""Workers and beat misbehave: killed mid-refresh, two of them, an outage backlog."""

from __future__ import annotations

import re
import time

import pytest
from pytest_httpserver import HTTPServer

from tests.factories import make_provider, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.processes import broker_count, purge_queues, wait_for
from tokens import get_token, redis_client
from tokens.constants import Reason
from tokens.models import Token
from tokens.queue import refresh_send

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def endpoint(httpserver: HTTPServer) -> TokenEndpoint:
    return TokenEndpoint(httpserver)


def executed_refreshes(log: str) -> int:
    return len(re.findall(r"Task tokens\.refresh_token\[[^\]]+\] succeeded", log))


def test_worker_killed_mid_refresh__lock_expires_and_next_refresh_succeeds(
    worker_factory, endpoint: TokenEndpoint
) -> None:

    purge_queues()
    victim = worker_factory(hostname="victim", TOKENS_LOCK_TTL="2")
    endpoint.delays = [30.0]  # the first call hangs until the worker is killed
    provider = make_provider(config=oauth2_config(endpoint.url), interval=600)
    wait_for(lambda: endpoint.calls == 1, 10, message="the refresh to start")
    assert redis_client.client().exists(f"tokens:lock:{provider.pk}")
    victim.kill()  # SIGKILL, mid-call: no release, no cleanup

    worker_factory(hostname="survivor", TOKENS_LOCK_TTL="2")
    assert get_token("api", timeout=20) == "tok-2"  # waits out the dead holder's lock
    assert endpoint.calls == 2  # no duplicate storm
    assert Token.objects.filter(provider=provider).count() == 1


def test_two_workers__never_run_one_providers_refresh_twice_at_once(
    worker_factory, endpoint: TokenEndpoint
) -> None:

    purge_queues()
    first = worker_factory(hostname="one", concurrency=4)
    second = worker_factory(hostname="two", concurrency=4)
    provider = make_provider(config=oauth2_config(endpoint.url), interval=600)
    wait_for(lambda: endpoint.calls == 1, 10, message="the first token")
    endpoint.delay = 0.5
    for _ in range(16):
        refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False)
    wait_for(
        lambda: executed_refreshes(first.log()) + executed_refreshes(second.log()) >= 17,
        30,
        message="all refresh messages to run",
    )
    assert executed_refreshes(first.log()) >= 2 and executed_refreshes(second.log()) >= 2
    assert endpoint.max_in_flight == 1
    assert endpoint.calls < 17  # the ones that found the lock taken skipped


def test_two_beats__at_most_one_endpoint_call_per_due_period(
    worker_factory, beat, endpoint: TokenEndpoint
) -> None:
    worker_factory(hostname="w")
    interval = 3
    provider = make_provider(config=oauth2_config(endpoint.url), interval=interval)
    wait_for(lambda: endpoint.calls == 1, 10, message="the first token")
    first, second = beat(name="beat-a"), beat(name="beat-b")
    started, calls = time.monotonic(), endpoint.calls
    time.sleep(4 * interval)
    window = time.monotonic() - started
    sent = "Sending due task tokens.dispatch "
    # Both beats dispatch (each only when something is due: whichever ticks first in a period).
    assert first.log().count(sent) + second.log().count(sent) >= 3
    assert endpoint.calls - calls <= window / interval + 1
    assert Token.objects.filter(provider=provider).count() >= 3


def test_outage_backlog__expired_messages_are_dropped_and_missed_runs_not_replayed(
    worker_factory, beat, endpoint: TokenEndpoint
) -> None:
    """Beat keeps sending its dispatch while no worker runs; when one comes back, the stale
    dispatches are discarded unread and the provider, due many times over, is refreshed once."""

    purge_queues()
    before = worker_factory(hostname="before")
    make_provider(config=oauth2_config(endpoint.url), interval=3)
    wait_for(lambda: endpoint.calls == 1, 10, message="the first token")
    before.stop()
    beat_process = beat()
    sent = "Sending due task tokens.dispatch "
    wait_for(
        lambda: beat_process.log().count(sent) >= 12,
        25,
        message="twelve dispatches (four periods of the provider) with no worker",
    )
    backlog = beat_process.log().count(sent)
    calls = endpoint.calls
    # Celery sends `expires` as the message's TTL too: RabbitMQ drops the stale dispatches
    # itself, so they never reach a worker; Redis keeps them for the worker to discard.
    dropped = max(0, backlog - broker_count("tokens.urgent"))

    after = worker_factory(hostname="after")
    discarded = "Discarding revoked task: tokens.dispatch_due"  # Celery's line for expired ones
    wait_for(
        lambda: dropped + after.log().count(discarded) >= backlog - 7,
        15,
        message=f"the stale ones of {backlog} queued dispatches to be discarded",
    )
    wait_for(lambda: endpoint.calls > calls, 10, message="the provider to be refreshed again")
    time.sleep(1.5)  # half its interval: replayed runs would show now; its next run is later
    assert endpoint.calls - calls == 1  # once, not once per missed run
