"""The example views call a protected API with a token (sync and async), against a real worker."""

from __future__ import annotations

import pytest
from django.test import AsyncClient, Client
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.factories import make_provider
from tests.processes import Process

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def api_url(worker: Process, httpserver: HTTPServer, settings) -> str:
    def handler(request: Request) -> Response:
        if request.headers.get("Authorization") != "Bearer example-token-1":
            return Response("unauthorized", status=401)
        return Response("pong")

    httpserver.expect_request("/ping").respond_with_handler(handler)
    settings.EXAMPLE_API_URL = httpserver.url_for("/ping")
    settings.EXAMPLE_TOKEN_PROVIDER = "example"
    make_provider("example", kind="callable", config={"path": "tests.callables.counted"})
    return settings.EXAMPLE_API_URL


def test_example_view__sync(api_url: str, client: Client) -> None:
    response = client.get("/example/call-api/")
    assert response.json() == {"status": 200, "body": "pong"}


async def _get_async(path: str) -> dict[str, object]:
    response = await AsyncClient().get(path)
    return response.json()  # type: ignore[no-any-return]


def test_example_view__async(api_url: str) -> None:
    import asyncio

    assert asyncio.run(_get_async("/example/call-api-async/")) == {"status": 200, "body": "pong"}


def test_example_view__unknown_provider_is_a_clear_503(client: Client, settings) -> None:
    settings.EXAMPLE_TOKEN_PROVIDER = "missing"
    response = client.get("/example/call-api/")
    assert response.status_code == 503
    assert "no token provider named 'missing'" in response.json()["error"]
