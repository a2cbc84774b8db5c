"""Run a full cycle with DEBUG logging, then look everywhere a secret could end up.

The client secret and every token value must appear in no log line, no Redis key or value
(cache, broker, results, events), no Celery event (what Flower shows), no admin page and no raw
database column.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from pytest_httpserver import HTTPServer

from tests.factories import SECRET
from tests.integration.endpoint import TokenEndpoint
from tests.integration.events import EventLog
from tests.processes import Process, wait_for
from tokens import get_token
from tokens.models import Provider, ProviderState, Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def redis_dump(url: str) -> Iterator[str]:
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        yield key.decode(errors="replace")
        if kind == "string":
            yield (client.get(key) or b"").decode(errors="replace")
        elif kind == "list":
            yield from (item.decode(errors="replace") for item in client.lrange(key, 0, -1))
        elif kind == "hash":
            yield from (f"{k!r}{v!r}" for k, v in client.hgetall(key).items())
        elif kind == "set":
            yield from (item.decode(errors="replace") for item in client.smembers(key))
        elif kind == "zset":
            yield from (item.decode(errors="replace") for item in client.zrange(key, 0, -1))


def database_dump() -> Iterator[str]:
    with connection.cursor() as cursor:
        for table in (
            "tokens_provider",
            "tokens_providerstate",
            "tokens_token",
            "django_celery_beat_periodictask",
        ):
            cursor.execute(f"SELECT * FROM {table}")
            for row in cursor.fetchall():
                yield " ".join(str(value) for value in row)


def test_leak_scan__no_secret_or_token_anywhere(
    worker_factory, beat, httpserver: HTTPServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = TokenEndpoint(httpserver, expires_in=60)
    worker: Process = worker_factory(hostname="leaks", loglevel="DEBUG", DJANGO_LOG_LEVEL="DEBUG")
    admin = Client()
    admin.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    pages: list[str] = []

    with EventLog() as events:
        # Create the provider in admin, with a known client secret.
        form = {
            "name": "api",
            "kind": "oauth2_client_credentials",
            "enabled": "on",
            "config": json.dumps({"token_url": endpoint.url, "client_id": "client-1"}),
            "secret": SECRET,
            "refresh_interval": "00:00:01",
            "refresh_state-TOTAL_FORMS": "0",
            "refresh_state-INITIAL_FORMS": "0",
            "tokens-TOTAL_FORMS": "0",
            "tokens-INITIAL_FORMS": "0",
        }
        response = admin.post("/admin/tokens/provider/add/", form)
        assert response.status_code == 302
        provider = Provider.objects.get(name="api")

        # Several refreshes, by beat and by readers.
        beat_process: Process = beat()
        wait_for(lambda: endpoint.calls >= 3, 20, message="three refreshes")
        assert get_token("api").startswith("tok-")

        # A failing refresh whose error echoes the secret and a token.
        endpoint.fail_with = (
            401,
            json.dumps(
                {
                    "error": "invalid_client",
                    "error_description": f"bad {SECRET} for {endpoint.issued[-1]}",
                }
            ),
            "application/json",
        )
        wait_for(
            lambda: ProviderState.objects.get(provider=provider).consecutive_failures >= 1,
            20,
            message="a failed refresh",
        )

        # Invalidate: a config change in admin voids the tokens; then recover.
        endpoint.fail_with = None
        change_url = f"/admin/tokens/provider/{provider.pk}/change/"
        form.update(
            secret="",
            config=json.dumps(
                {"token_url": endpoint.url, "client_id": "client-1", "scope": "read"}
            ),
        )
        assert admin.post(change_url, form).status_code == 302
        wait_for(
            lambda: ProviderState.objects.get(provider=provider).consecutive_failures == 0,
            20,
            message="recovery",
        )
        get_token("api", timeout=10)

        pages += [
            admin.get(url).content.decode()
            for url in (
                "/admin/tokens/provider/",
                change_url,
                "/admin/tokens/providerstate/",
                "/admin/django_celery_beat/periodictask/",
            )
        ]
        time.sleep(1)

    needles = {SECRET, *endpoint.issued, base64.b64encode(f"client-1:{SECRET}".encode()).decode()}
    assert len(endpoint.issued) >= 3
    assert all(len(needle) >= 5 for needle in needles)
    assert Token.objects.filter(provider=provider).exists()
    haystacks = {
        "worker log": worker.log(),
        "beat log": beat_process.log(),
        "test process log": caplog.text,
        "Celery events": json.dumps(events.events, default=str),
        "admin pages": "\n".join(pages),
        "Redis (cache)": "\n".join(redis_dump(settings.REDIS_URL)),
        "Redis (broker, results, events)": "\n".join(redis_dump(settings.CELERY_BROKER_URL)),
        "database": "\n".join(database_dump()),
    }
    assert "DEBUG" in haystacks["worker log"] and len(events.events) > 5
    assert "task-received" in haystacks["Celery events"]
    leaks = [
        f"{where}: {needle[:6]}…"
        for where, text in haystacks.items()
        for needle in needles
        if needle in text
    ]
    assert leaks == []
