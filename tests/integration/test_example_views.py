"""The example views call a protected API with a token (sync and async), against a real worker.

Example code is copied: they are for logged-in users, mounted only with DJANGO_DEBUG or
EXAMPLE_VIEWS, and return the upstream status and nothing else (an upstream that echoes the
Authorization header, or a refresh error, never reaches the caller)."""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.urls import clear_url_caches
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.factories import make_provider
from tests.processes import Process
from tokens.models import ProviderState

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def remount(settings, *, enabled: bool) -> None:
    import project.urls

    settings.EXAMPLE_VIEWS = enabled
    importlib.reload(project.urls)
    clear_url_caches()


@pytest.fixture
def mounted(settings) -> Iterator[None]:
    remount(settings, enabled=True)
    yield
    remount(settings, enabled=False)


@pytest.fixture
def user() -> User:
    return User.objects.create_user("dev", password="pw")


@pytest.fixture
def api_url(worker: Process, httpserver: HTTPServer, settings, mounted: None) -> str:
    def echo(request: Request) -> Response:
        # A careless API that echoes the request's headers.
        header = request.headers.get("Authorization", "")
        status = 200 if header == "Bearer example-token-1" else 401
        return Response(f"you sent {header}", status=status)

    httpserver.expect_request("/ping").respond_with_handler(echo)
    settings.EXAMPLE_API_URL = httpserver.url_for("/ping")
    settings.EXAMPLE_TOKEN_PROVIDER = "example"
    make_provider("example", kind="callable", config={"path": "tests.callables.counted"})
    return settings.EXAMPLE_API_URL


def test_example_view__sync_returns_the_status_only(
    api_url: str, client: Client, user: User
) -> None:
    client.force_login(user)
    response = client.get("/example/call-api/")
    assert response.json() == {"upstream_status": 200, "ok": True}
    assert b"example-token" not in response.content


def test_example_view__async_returns_the_status_only(api_url: str, user: User) -> None:
    async def get() -> tuple[int, bytes]:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get("/example/call-api-async/")
        return response.status_code, response.content

    status, content = asyncio.run(get())
    assert status == 200
    assert b'"upstream_status": 200' in content and b"example-token" not in content


def test_example_view__anonymous_callers_are_sent_to_log_in(api_url: str, client: Client) -> None:
    response = client.get("/example/call-api/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_example_view__a_refresh_error_is_logged_not_returned(
    worker: Process, client: Client, user: User, settings, mounted: None, caplog
) -> None:
    settings.EXAMPLE_TOKEN_PROVIDER = "broken"
    provider = make_provider("broken", kind="callable", config={"path": "tests.callables.explodes"})
    ProviderState.objects.filter(provider=provider).update(
        last_error="permanent: internal detail of the broken provider"
    )
    client.force_login(user)
    with caplog.at_level(logging.WARNING, logger="project.views"):
        response = client.get("/example/call-api/")
    assert response.status_code == 503
    assert b"broken" not in response.content and b"internal detail" not in response.content
    assert "no token for the API call" in caplog.text


def test_example_views__are_not_mounted_without_debug_or_the_setting(
    client: Client, user: User, settings
) -> None:
    remount(settings, enabled=False)
    assert not settings.DEBUG
    client.force_login(user)
    assert client.get("/example/call-api/").status_code == 404
