"""The httpx and requests helpers against a real protected API, with a real worker refreshing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.factories import make_provider
from tests.processes import Process, wait_for
from tokens import aget_token
from tokens.auth import HttpxTokenAuth, RequestsTokenAuth
from tokens.models import ProviderState, Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


class ProtectedApi:
    """Accepts only the tokens in ``accepted``; records the Authorization headers it saw."""

    def __init__(self, server: HTTPServer) -> None:
        self.seen: list[str] = []
        self.rejected: set[str] = set()
        self.reject_all = False
        server.expect_request("/data").respond_with_handler(self._handle)
        self.url = server.url_for("/data")

    def _handle(self, request: Request) -> Response:
        header = request.headers.get("Authorization", "")
        self.seen.append(header)
        if self.reject_all or header in self.rejected:
            return Response("unauthorized", status=401)
        return Response(f"ok {header}")


@pytest.fixture
def api(worker: Process, httpserver: HTTPServer) -> ProtectedApi:
    provider = make_provider(kind="callable", config={"path": "tests.callables.counted"})
    wait_for(lambda: Token.objects.filter(provider=provider).exists(), 10, message="a token")
    return ProtectedApi(httpserver)


def call_httpx(url: str) -> tuple[int, str]:
    with httpx.Client(auth=HttpxTokenAuth("api", timeout=10)) as client:
        response = client.get(url)
    return response.status_code, response.text


def call_httpx_async(url: str) -> tuple[int, str]:
    async def go() -> tuple[int, str]:
        async with httpx.AsyncClient(auth=HttpxTokenAuth("api", timeout=10)) as client:
            response = await client.get(url)
        return response.status_code, response.text

    return asyncio.run(go())


def call_requests(url: str) -> tuple[int, str]:
    response = requests.get(url, auth=RequestsTokenAuth("api", timeout=10), timeout=10)
    return response.status_code, response.text


CLIENTS = {"httpx": call_httpx, "httpx-async": call_httpx_async, "requests": call_requests}


@pytest.mark.parametrize("client", list(CLIENTS))
def test_helper__adds_the_header(api: ProtectedApi, client: str) -> None:
    status, text = CLIENTS[client](api.url)
    assert (status, text) == (200, "ok Bearer api-token-1")


@pytest.mark.parametrize("client", list(CLIENTS))
def test_helper__401_invalidates_and_retries_once_with_the_new_token(
    api: ProtectedApi, client: str
) -> None:
    api.rejected.add("Bearer api-token-1")  # the API revoked it before it expired
    status, text = CLIENTS[client](api.url)
    assert (status, text) == (200, "ok Bearer api-token-2")
    assert api.seen == ["Bearer api-token-1", "Bearer api-token-2"]


@pytest.mark.parametrize("client", list(CLIENTS))
def test_helper__gives_up_after_one_retry(api: ProtectedApi, client: str) -> None:
    api.reject_all = True
    status, _ = CLIENTS[client](api.url)
    assert status == 401
    assert api.seen == ["Bearer api-token-1", "Bearer api-token-2"]  # one retry, no loop


def test_aget_token__the_event_loop_keeps_serving_while_one_waits(
    worker: Process, redis_client
) -> None:
    redis_client.set("test:delay:slow", "1.0")  # the first token takes a second
    make_provider("slow", kind="callable", config={"path": "tests.callables.counted"})

    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        token = await aget_token("slow", timeout=20)
        waited = time.monotonic() - started
        ticking.cancel()
        assert waited > 0.5  # it really waited for the slow generator
        return token, ticks

    token, ticks = asyncio.run(main())
    assert token == "slow-token-1"
    assert ticks > 20  # other coroutines ran all along


class ElsewhereApi:
    """The protected API redirects to another origin (another port), which answers 401 and
    records every Authorization header it receives."""

    def __init__(self, server: HTTPServer, elsewhere: HTTPServer) -> None:
        self.seen_elsewhere: list[str] = []
        server.expect_request("/moved").respond_with_data(
            "", status=302, headers={"Location": elsewhere.url_for("/grab")}
        )
        elsewhere.expect_request("/grab").respond_with_handler(self._grab)
        self.url = server.url_for("/moved")

    def _grab(self, request: Request) -> Response:
        self.seen_elsewhere.append(request.headers.get("Authorization", ""))
        return Response("who are you", status=401)


@pytest.fixture
def elsewhere() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield server
    server.clear()
    server.stop()


def call_following_redirects(client: str, url: str) -> int:
    if client == "requests":
        return requests.get(url, auth=RequestsTokenAuth("api", timeout=10), timeout=10).status_code
    if client == "httpx":
        with httpx.Client(auth=HttpxTokenAuth("api", timeout=10), follow_redirects=True) as c:
            return c.get(url).status_code

    async def go() -> int:
        async with httpx.AsyncClient(
            auth=HttpxTokenAuth("api", timeout=10), follow_redirects=True
        ) as c:
            return (await c.get(url)).status_code

    return asyncio.run(go())


@pytest.mark.parametrize("client", list(CLIENTS))
def test_helper__a_401_from_a_redirect_target_gets_no_token_and_voids_nothing(
    api: ProtectedApi, httpserver: HTTPServer, elsewhere: HTTPServer, redis_client, client: str
) -> None:
    api_elsewhere = ElsewhereApi(httpserver, elsewhere)
    token = Token.objects.get(provider__name="api")
    assert call_following_redirects(client, api_elsewhere.url) == 401
    assert api_elsewhere.seen_elsewhere == [""]  # no token, not even on a retry
    assert int(redis_client.get("test:calls:api")) == 1  # no refresh was caused
    assert list(Token.objects.filter(provider__name="api")) == [token]
    state = ProviderState.objects.get(provider__name="api")
    assert state.current_version == token.version  # the token was not voided


@pytest.mark.parametrize("client", list(CLIENTS))
def test_helper__20_page_loads_against_an_api_rejecting_every_token_cost_one_refresh(
    api: ProtectedApi, redis_client, client: str
) -> None:
    """Invalidation is bounded per provider (TOKENS_INVALIDATE_COOLDOWN): an API that answers
    401 to everything cannot turn each anonymous page load into a token-endpoint call."""
    api.reject_all = True
    for _ in range(20):
        status, _ = CLIENTS[client](api.url)
        assert status == 401
    calls = int(redis_client.get("test:calls:api"))
    assert calls == 2  # the first token, and one refresh after the first 401


@pytest.mark.parametrize("client", list(CLIENTS))
def test_helper__a_401_home_after_a_detour_that_dropped_the_header_voids_nothing(
    api: ProtectedApi, httpserver: HTTPServer, elsewhere: HTTPServer, redis_client, client: str
) -> None:
    """A -> B -> A: the header is dropped at B, so A's 401 is about a request without our
    token; it must not void it (nor earn a retry)."""
    httpserver.expect_request("/detour").respond_with_data(
        "", status=302, headers={"Location": elsewhere.url_for("/bounce")}
    )
    elsewhere.expect_request("/bounce").respond_with_data(
        "", status=302, headers={"Location": httpserver.url_for("/home")}
    )
    httpserver.expect_request("/home").respond_with_data("who are you", status=401)
    token = Token.objects.get(provider__name="api")
    assert call_following_redirects(client, httpserver.url_for("/detour")) == 401
    assert int(redis_client.get("test:calls:api")) == 1  # no refresh was caused
    assert ProviderState.objects.get(provider__name="api").current_version == token.version
