"""The token endpoint fails for several refresh periods: a real worker, beat and HTTP endpoint.

Expect: the last good token is served while unexpired and never after; then TokenUnavailable
naming the (sanitized) error; transient errors back off (the endpoint's hits are counted);
permanent ones do not hammer; the first attempt after the endpoint heals succeeds.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pytest_httpserver import HTTPServer

from tests.factories import SECRET, make_provider, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.processes import Process, purge_queues, start_worker, wait_for
from tokens import TokenUnavailable, get_token
from tokens.models import ProviderState, Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

HTTP_TIMEOUT = 0.5
LIFETIME = 4  # seconds the good token lives


@pytest.fixture(scope="module")
def worker(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:

    purge_queues()
    process = start_worker(tmp_path_factory.mktemp("worker"), TOKENS_HTTP_TIMEOUT=str(HTTP_TIMEOUT))
    yield process
    process.stop()


@dataclass
class Mode:
    failure: tuple[int, str, str] | None
    headers: dict[str, str]
    delay: float
    transient: bool
    reason: str  # what TokenUnavailable and last_error must say


MODES = {
    "http-500": Mode(
        (500, '{"error": "server_error"}', "application/json"), {}, 0, True, "server_error"
    ),
    "http-429-retry-after": Mode(
        (429, "slow down", "text/plain"), {"Retry-After": "2"}, 0, True, "HTTP 429"
    ),
    "hang-past-timeout": Mode(None, {}, 2.0, True, f"did not answer within {HTTP_TIMEOUT}s"),
    "html-with-200": Mode(
        (200, "<html><body>Sign in</body></html>", "text/html"),
        {},
        0,
        True,
        "non-JSON body (text/html)",
    ),
    "invalid-client-401": Mode(
        (401, '{"error": "invalid_client"}', "application/json"), {}, 0, False, "invalid_client"
    ),
}


class Hammer:
    """Calls get_token() every 20 ms from a thread, as a busy application would."""

    def __init__(self) -> None:
        self.results: list[tuple[float, str]] = []  # (call start, token or error text)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        from django.db import connection

        try:
            while not self._stop.is_set():
                started = time.time()
                try:
                    outcome = get_token("api", timeout=0.2)
                except TokenUnavailable as error:
                    outcome = f"TokenUnavailable: {error}"
                self.results.append((started, outcome))
                time.sleep(0.02)
        finally:
            connection.close()

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("mode_name", list(MODES))
def test_endpoint_failure__serves_last_good_token_then_fails_clearly_then_recovers(
    worker: Process, beat, httpserver: HTTPServer, mode_name: str
) -> None:
    mode = MODES[mode_name]
    endpoint = TokenEndpoint(httpserver, expires_in=LIFETIME)
    provider = make_provider(config=oauth2_config(endpoint.url), interval=1)
    wait_for(lambda: Token.objects.filter(provider=provider).exists(), 5, message="tok-1")
    good = Token.objects.get(provider=provider)
    expires_at = good.expires_at.timestamp()

    endpoint.fail_with, endpoint.fail_headers, endpoint.delay = (
        mode.failure,
        mode.headers,
        mode.delay,
    )
    failing_from = len(endpoint.times)
    beat()
    with Hammer() as hammer:
        while time.time() < expires_at + 2.0:
            time.sleep(0.1)
    failing_hits = endpoint.times[failing_from:]

    # The good token while it lasted, never after; then a clear, sanitized error.
    served = [(at, outcome) for at, outcome in hammer.results if outcome == "tok-1"]
    failed = [(at, outcome) for at, outcome in hammer.results if outcome != "tok-1"]
    assert served, "the last good token was not served"
    assert all(at < expires_at for at, _ in served), "an expired token was returned"
    assert all(at >= expires_at - 0.5 for at, _ in failed), f"failed while valid: {failed[:2]}"
    assert failed, "no TokenUnavailable after expiry"
    for _, outcome in failed:
        assert outcome.startswith("TokenUnavailable"), outcome
        assert mode.reason in outcome, outcome
        assert SECRET not in outcome and "tok-1" not in outcome

    state = ProviderState.objects.get(provider=provider)
    assert state.consecutive_failures >= 1
    assert mode.reason in state.last_error
    assert state.last_error.startswith("transient" if mode.transient else "permanent")

    # No tight loop: hundreds of get_token calls and a beat every second, few endpoint hits.
    window = time.monotonic() - endpoint.times[failing_from] if failing_hits else 0
    assert len(hammer.results) > 100
    assert 1 <= len(failing_hits) <= window + 2
    gaps = [b - a for a, b in itertools.pairwise(failing_hits)]
    if mode_name == "http-429-retry-after":
        assert all(gap >= 1.9 for gap in gaps), gaps
    elif mode.transient and len(gaps) >= 2:
        assert max(gaps[1:]) >= gaps[0], gaps  # the waits grow

    # Heal: the first attempt afterwards succeeds.
    endpoint.fail_with, endpoint.delay = None, 0
    healed_at = endpoint.calls
    wait_for(
        lambda: ProviderState.objects.get(provider=provider).consecutive_failures == 0,
        15,
        interval=0.1,
        message="recovery",
    )
    assert endpoint.calls == healed_at + 1
    assert get_token("api", timeout=5) == f"tok-{healed_at + 1}"
