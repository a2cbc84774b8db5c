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
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from pytest_httpserver import HTTPServer

from tests.factories import SECRET
from tests.integration.endpoint import TokenEndpoint
from tests.integration.events import EventLog
from tests.processes import Process, broker_dump, redis_dump, wait_for
from tokens import get_token
from tokens.models import Provider, ProviderState, Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


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
        "Redis (cache, results)": "\n".join(redis_dump(settings.REDIS_URL)),
        "broker (Redis: every key; RabbitMQ: the messages waiting)": "\n".join(broker_dump()),
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


def test_leak_scan__refresh_tokens_and_private_keys_appear_nowhere(
    worker_factory,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """A connected account rotating its refresh token every few seconds, and a jwt_bearer
    provider whose key signs assertions (one of them refused), all at DEBUG: no refresh
    token, private key or client secret, nor any 8-character piece of one in any encoding, in
    logs, events, admin pages (superuser and view-only), health, metrics, Redis or the
    database."""
    from django.contrib.auth.models import Permission

    from tests.idp import start_idp
    from tests.integration.test_connected_accounts import CALLBACK, connect
    from tests.keys import public_pem, rsa_key_pem
    from tests.leaks import leaked
    from tests.token_servers import AssertionServer, Issuer

    caplog.set_level(logging.DEBUG)
    key = rsa_key_pem("leak-scan")
    worker: Process = worker_factory(hostname="leaks2", loglevel="DEBUG", DJANGO_LOG_LEVEL="DEBUG")
    admin = Client()
    admin.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    viewer_user = User.objects.create_user("viewer", password="pw-viewer-1", is_staff=True)
    viewer_user.user_permissions.add(Permission.objects.get(codename="view_provider"))
    viewer = Client()
    viewer.force_login(viewer_user)
    refresh_tokens: set[str] = set()
    access_tokens: set[str] = set()

    with (
        start_idp(tmp_path / "idp", access_token_seconds=3, redirect_uris=[CALLBACK]) as idp,
        AssertionServer(issuers={"robot": Issuer(public_pem(key), subjects=["ok"])}) as server,
        EventLog() as events,
    ):
        crm = Provider.objects.create(
            name="crm",
            kind="oauth2_refresh_token",
            config={
                "authorize_url": idp.authorize_url,
                "token_url": idp.token_url,
                "client_id": idp.client_id,
            },
            secret=idp.client_secret,
        )
        connect(admin, idp, crm)
        robot = Provider.objects.create(
            name="robot",
            kind="jwt_bearer",
            config={"token_url": server.token_url, "issuer": "robot", "subject": "ok"},
            secret=key,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # readers keep the account rotating
            access_tokens.add(get_token("crm", timeout=10))
            refresh_tokens.add(Provider.objects.get(pk=crm.pk).refresh_token)
            time.sleep(0.2)
        assert get_token("robot", timeout=10)
        robot.config = {**robot.config, "subject": "refused"}
        robot.save()  # its next assertion is refused: an error with the issuer's words
        wait_for(
            lambda: ProviderState.objects.get(provider=robot).consecutive_failures >= 1,
            20,
            message="a refused assertion",
        )
        access_tokens |= {t.value for t in Token.objects.all()}
        pages = [
            client.get(url).content.decode()
            for client in (admin, viewer)
            for url in (
                "/admin/tokens/provider/",
                f"/admin/tokens/provider/{crm.pk}/change/",
                f"/admin/tokens/provider/{robot.pk}/change/",
                "/tokens/health/",
                "/tokens/metrics",
            )
        ]
        time.sleep(1)

    assert len(refresh_tokens) >= 3, "the refresh token should have rotated a few times"
    secrets = {*refresh_tokens, key, idp.client_secret}
    haystacks = {
        "worker log": worker.log(),
        "test process log": "\n".join(
            record.getMessage() for record in caplog.records if not _token_server(record)
        ),
        "Celery events": json.dumps(events.events, default=str),
        "admin, health and metrics pages": "\n".join(pages),
        "Redis (cache, results)": "\n".join(redis_dump(settings.REDIS_URL)),
        "broker (Redis: every key; RabbitMQ: the messages waiting)": "\n".join(broker_dump()),
        "database": "\n".join(database_dump()),
    }
    assert "DEBUG" in haystacks["worker log"]
    leaks = [
        f"{where}: {sorted(found)[:3]}"
        for where, text in haystacks.items()
        for secret in secrets
        if (found := leaked(text, secret))
    ]
    leaks += [
        f"{where}: an access token"
        for where, text in haystacks.items()
        for token in access_tokens
        if token in text
    ]
    assert leaks == []


# The test's token endpoint (authlib's server classes) runs in this process and logs what it
# issues: the other party's log, not tokens'.
SERVER_LOGGERS = (
    "authlib.oauth2.rfc7523.jwt_bearer",
    "authlib.oauth2.rfc7523.client",
    "authlib.oauth2.rfc6749.grants",
    "authlib.oauth2.rfc6749.authorization_server",
)


def _token_server(record: logging.LogRecord) -> bool:
    return record.name.startswith(SERVER_LOGGERS)
