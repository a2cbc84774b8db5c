"""Tokens never lapse on schedule, never reach a caller expired, and an outage fails callers
fast and heals within seconds (real worker, real beat, a real local token endpoint)."""

from __future__ import annotations

import time

import pytest
from django.utils import timezone
from pytest_httpserver import HTTPServer

from tests.factories import make_provider, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.processes import Process, purge_queues, wait_for
from tokens import TokenUnavailable, get_token
from tokens.models import ProviderState
from tokens.status import Status, status_of

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def expiry_of(endpoint: TokenEndpoint, token: str) -> float:
    """When ``token`` expires by the issuer's clock (monotonic): its request's arrival plus
    its lifetime."""
    number = int(token.removeprefix("tok-"))
    return endpoint.times[number - 1] + endpoint.expires_in


def test_short_lived_token__never_expired_on_schedule_or_in_a_callers_hands(
    worker: Process, beat, httpserver: HTTPServer
) -> None:
    """A 2 s token and a 60 s interval: the schedule refreshes before expiry (not once a
    minute); over 20 s no read returns a token past its expiry and the status is never
    "expired"."""
    purge_queues()
    endpoint = TokenEndpoint(httpserver, expires_in=2)
    provider = make_provider("short", config=oauth2_config(endpoint.url), interval=60)
    wait_for(lambda: endpoint.calls >= 1, 10, message="the first token")
    beat()
    reads, statuses = 0, set()
    until = time.monotonic() + 20
    while time.monotonic() < until:
        token = get_token("short", timeout=5)
        assert time.monotonic() < expiry_of(endpoint, token), f"{token} handed out expired"
        reads += 1
        provider.refresh_from_db()
        state = ProviderState.objects.get(provider=provider)
        statuses.add(status_of(provider, state, refreshing=False, now=timezone.now()))
        time.sleep(0.05)
    assert reads > 100
    assert Status.EXPIRED not in statuses, statuses
    assert endpoint.calls >= 10  # refreshed every second or so, not once a minute


def test_permanent_error__get_token_fails_at_once(worker: Process, httpserver: HTTPServer) -> None:
    endpoint = TokenEndpoint(httpserver)
    endpoint.fail_with = (401, '{"error": "invalid_client"}', "application/json")
    make_provider("locked", config=oauth2_config(endpoint.url))
    wait_for(lambda: endpoint.calls >= 1, 10, message="the failing first attempt")
    wait_for(
        lambda: ProviderState.objects.filter(
            provider__name="locked", permanent_error=True
        ).exists(),
        10,
        message="the permanent error to be recorded",
    )
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="invalid_client"):
        get_token("locked", timeout=5)
    assert time.monotonic() - started < 0.5


def test_outage_longer_than_a_lifetime__fails_fast_then_heals_within_seconds(
    worker: Process, httpserver: HTTPServer
) -> None:
    """The endpoint answers 500 for longer than a token lives: callers get the last token only
    until its expiry minus the skew, then an error within a second, and a new token within
    5 s of the endpoint healing, at most about one request a second meanwhile."""
    purge_queues()
    endpoint = TokenEndpoint(httpserver, expires_in=4)  # skew: 0.4 s
    make_provider("flaky", config=oauth2_config(endpoint.url), interval=60)
    first = get_token("flaky", timeout=10)
    endpoint.fail_with = (500, '{"error": "server_error"}', "application/json")
    outage_ends = time.monotonic() + 4 + 6  # one lifetime and then some
    errors: list[float] = []
    while time.monotonic() < outage_ends:
        started = time.monotonic()
        try:
            token = get_token("flaky", timeout=10)
        except TokenUnavailable:
            errors.append(time.monotonic() - started)
        else:
            assert token == first
            assert time.monotonic() <= expiry_of(endpoint, first) - 0.4 + 0.05, "past the skew"
        time.sleep(0.1)
    calls_during = endpoint.calls - 1
    assert errors and max(errors) < 1.0, errors
    assert calls_during <= 10 + 2, endpoint.times  # about one a second at most

    endpoint.fail_with = None
    healed = time.monotonic()
    recovered = None
    while time.monotonic() < healed + 10:
        try:
            token = get_token("flaky", timeout=10)
        except TokenUnavailable:
            time.sleep(0.1)
            continue
        recovered = time.monotonic() - healed
        assert token != first
        break
    assert recovered is not None and recovered <= 5.0, recovered
