"""A refresh that stalls past its lock TTL and finishes late never replaces the newer token."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer

from tests.factories import make_provider, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.processes import wait_for
from tokens import cache, get_token, redis_client
from tokens.constants import Reason
from tokens.models import ProviderState, Token
from tokens.queue import refresh_send

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_stale_refresh__finishing_late_does_not_overwrite_the_newer_token(
    worker_factory, httpserver: HTTPServer
) -> None:
    endpoint = TokenEndpoint(httpserver)
    # The lock lives 1 s; the HTTP timeout is longer than the stall.
    worker_factory(hostname="stale", TOKENS_LOCK_TTL="1", TOKENS_HTTP_TIMEOUT="10")
    endpoint.delays = [0.0, 4.0, 0.0]  # 1: the first token, 2: stalls, 3: newer, fast
    provider = make_provider(config=oauth2_config(endpoint.url), interval=600)
    wait_for(lambda: Token.objects.filter(provider=provider).count() == 1, 10, message="tok-1")

    refresh_send(
        provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False
    )  # call 2 starts and stalls past the lock's TTL
    wait_for(lambda: endpoint.calls == 2, 10, message="the stalled call")
    wait_for(
        lambda: not redis_client.client().exists(f"tokens:lock:{provider.pk}"),
        5,
        message="the lock to expire",
    )
    refresh_send(
        provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False
    )  # call 3: takes the expired lock, stores tok-3
    wait_for(
        lambda: cache.entry_get("api") and cache.entry_get("api").value == "tok-3",
        10,
        message="the newer token",
    )
    wait_for(lambda: len(endpoint.issued) == 3, 10, message="the stalled call to finish")
    wait_for(lambda: worker_log_has(worker_factory, "outcome=stale"), 10, message="the discard")

    state = ProviderState.objects.get(provider=provider)
    newest = Token.objects.get(provider=provider, version=state.current_version)
    assert newest.value == "tok-3"
    assert not any(token.value == "tok-2" for token in Token.objects.filter(provider=provider))
    assert cache.entry_get("api").value == "tok-3"
    assert get_token("api") == "tok-3"


def worker_log_has(worker_factory, text: str) -> bool:
    return any(text in process.log() for process in worker_factory.started)
