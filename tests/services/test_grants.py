"""Connected accounts in the refresh service: rotated refresh tokens are never lost or
overwritten by older ones, and a grant that is gone says so ("reconnect needed") at once.

The token endpoint is a real local HTTP server; end to end against django-oauth-toolkit is
tests/integration/test_connected_accounts.py.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.factories import state
from tokens import TokenUnavailable, cache, get_token, memory
from tokens.constants import Outcome, Reason
from tokens.exceptions import GeneratorError
from tokens.generators import GeneratedToken, Generator
from tokens.models import Provider, ProviderState, Token
from tokens.services import invalidation, refresh, versions
from tokens.status import Status, status_of

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_queues")]

CLIENT_SECRET = "client-secret-for-rotation-7Qx"


class RotatingEndpoint:
    """A token endpoint that rotates refresh tokens the strict way: each one works once."""

    def __init__(self) -> None:
        self.issued = 0
        self.live = {"rt-0"}
        self.used: list[str] = []
        self.answer: dict[str, Any] | None = None  # overrides the next answer

    def __call__(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        presented = form.get("refresh_token", "")
        self.used.append(presented)
        if form.get("grant_type") != "refresh_token" or presented not in self.live:
            return Response(
                json.dumps({"error": "invalid_grant", "error_description": "bad refresh token"}),
                status=400,
                content_type="application/json",
            )
        self.live.discard(presented)
        self.issued += 1
        rotated = f"rt-{self.issued}"
        self.live.add(rotated)
        body = {
            "access_token": f"at-{self.issued}",
            "token_type": "Bearer",
            "expires_in": 300,
            "refresh_token": rotated,
        }
        if self.answer is not None:
            body = {**body, **self.answer}
            self.answer = None
        return Response(json.dumps(body), content_type="application/json")


@pytest.fixture
def endpoint(httpserver: HTTPServer) -> RotatingEndpoint:
    handler = RotatingEndpoint()
    httpserver.expect_request("/token", method="POST").respond_with_handler(handler)
    return handler


def connected(httpserver: HTTPServer, name: str = "crm", **fields: Any) -> Provider:
    return Provider.objects.create(
        name=name,
        kind="oauth2_refresh_token",
        config={
            "authorize_url": httpserver.url_for("/authorize"),
            "token_url": httpserver.url_for("/token"),
            "client_id": "crm-client",
        },
        secret=CLIENT_SECRET,
        refresh_token="rt-0",
        refresh_interval=timedelta(minutes=5),
        **fields,
    )


def stored_refresh_token(provider: Provider) -> str:
    return Provider.objects.get(pk=provider.pk).refresh_token


def test_refresh__stores_the_rotated_refresh_token_encrypted(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.STORED
    assert endpoint.used == ["rt-0"]
    assert stored_refresh_token(provider) == "rt-1"
    assert state(provider).refresh_token_version == state(provider).current_version


def test_refresh__each_refresh_token_is_sent_once(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    for _ in range(5):
        assert refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome == (
            Outcome.STORED
        )
    assert endpoint.used == ["rt-0", "rt-1", "rt-2", "rt-3", "rt-4"]
    assert stored_refresh_token(provider) == "rt-5"
    with connection.cursor() as cursor:
        cursor.execute("SELECT refresh_token FROM tokens_provider WHERE id = %s", [provider.pk])
        (raw,) = cursor.fetchone()
    assert "rt-5" not in raw and raw.startswith("gAAAA")  # Fernet, never plaintext


def test_versions__an_older_refresh_never_overwrites_a_newer_refresh_token(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    now = timezone.now()
    older = versions.fence_next(provider_id=provider.pk)
    newer = versions.fence_next(provider_id=provider.pk)
    versions.tokens_store_many(
        items=[(provider, newer, GeneratedToken("at-new", refresh_token="rt-new"), now)]
    )
    late = (provider, older, GeneratedToken("at-old", refresh_token="rt-old"), now)
    assert versions.tokens_store_many(items=[late]) == [None]
    assert stored_refresh_token(provider) == "rt-new"
    assert state(provider).refresh_token_version == newer


def test_versions__rotated_refresh_token_is_kept_when_its_access_token_loses(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    """An invalidation moved the access token's fence on while the refresh ran: its access
    token is void, but the issuer already retired rt-0, so rt-1 must be kept."""
    provider = connected(httpserver)
    fence = versions.fence_next(provider_id=provider.pk)
    invalidation.provider_invalidate(provider=provider)
    item = (provider, fence, GeneratedToken("at-1", refresh_token="rt-1"), timezone.now())
    assert versions.tokens_store_many(items=[item]) == [None]
    assert stored_refresh_token(provider) == "rt-1"


def test_refresh__a_refused_answer_still_keeps_its_rotated_refresh_token(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    endpoint.answer = {"access_token": "has a space"}  # refused: not a valid token
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.FAILED
    assert stored_refresh_token(provider) == "rt-1"
    assert refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome == (
        Outcome.STORED
    )
    assert endpoint.used == ["rt-0", "rt-1"]


def test_provider_save__a_stale_instance_never_writes_an_old_refresh_token_back(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    read_before = Provider.objects.get(pk=provider.pk)  # an admin form, a script...
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)  # rotates to rt-1
    read_before.refresh_interval = timedelta(minutes=10)
    read_before.save()
    assert stored_refresh_token(provider) == "rt-1"
    assert read_before.refresh_token == "rt-1"
    # A refresh token set on purpose is written (a person pasted a new one).
    read_before.refresh_token = "rt-pasted"
    read_before.save()
    assert stored_refresh_token(provider) == "rt-pasted"


def test_admin_form__left_blank_keeps_the_rotated_refresh_token(
    httpserver: HTTPServer, endpoint: RotatingEndpoint, admin_client: Client
) -> None:
    provider = connected(httpserver)
    page = admin_client.get(f"/admin/tokens/provider/{provider.pk}/change/")
    assert page.status_code == 200
    assert b"rt-0" not in page.content and b"A refresh token is stored" in page.content
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)  # rt-1 meanwhile
    response = admin_client.post(
        f"/admin/tokens/provider/{provider.pk}/change/",
        {
            "name": "crm",
            "kind": "oauth2_refresh_token",
            "enabled": "on",
            "config": json.dumps(provider.config),
            "secret": "",
            "refresh_token": "",
            "refresh_interval": "00:07:00",
            **_inline_management(),
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert stored_refresh_token(provider) == "rt-1"


def test_admin_form__a_new_token_endpoint_needs_the_refresh_token_again(
    httpserver: HTTPServer, endpoint: RotatingEndpoint, admin_client: Client
) -> None:
    provider = connected(httpserver)
    elsewhere = {**provider.config, "token_url": "https://attacker.example/token"}
    response = admin_client.post(
        f"/admin/tokens/provider/{provider.pk}/change/",
        {
            "name": "crm",
            "kind": "oauth2_refresh_token",
            "enabled": "on",
            "config": json.dumps(elsewhere),
            "secret": CLIENT_SECRET,
            "refresh_token": "",
            "refresh_interval": "00:05:00",
            **_inline_management(),
        },
    )
    assert response.status_code == 200
    assert "Connect again (or paste a refresh token)" in response.content.decode()
    assert Provider.objects.get(pk=provider.pk).config["token_url"] == provider.config["token_url"]


def _inline_management() -> dict[str, str]:
    fields: dict[str, str] = {}
    for prefix in ("refresh_state", "tokens"):
        fields.update(
            {
                f"{prefix}-TOTAL_FORMS": "0",
                f"{prefix}-INITIAL_FORMS": "0",
                f"{prefix}-MIN_NUM_FORMS": "0",
                f"{prefix}-MAX_NUM_FORMS": "0",
            }
        )
    return fields


def test_refresh__invalid_grant_means_reconnect_needed_and_no_retries(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    assert refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome == (
        Outcome.STORED
    )
    assert get_token("crm") == "at-1"
    endpoint.live.clear()  # the person revoked the app at the issuer
    failed = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert failed.outcome == Outcome.FAILED and failed.permanent
    current = state(provider)
    assert current.reconnect_needed
    assert "reconnect needed" in current.last_error and "invalid_grant" in current.last_error
    assert status_of(provider, current, refreshing=False, now=timezone.now()) == Status.RECONNECT
    # Never retried on a schedule: nothing changes until a person connects it again.
    an_hour_ago = timezone.now() - timedelta(hours=1)
    ProviderState.objects.filter(provider=provider).update(
        last_attempt_at=an_hour_ago, last_refresh_at=an_hour_ago
    )
    calls = len(endpoint.used)
    for reason in (Reason.SCHEDULE, Reason.READER, Reason.RETRY):
        assert refresh.token_refresh(provider_id=provider.pk, reason=reason).outcome == (
            Outcome.BACKOFF
        )
    assert len(endpoint.used) == calls
    # The last good access token is served until it expires...
    assert get_token("crm") == "at-1"
    # ...then readers are told at once (no waiting out the timeout) and why.
    ProviderState.objects.filter(provider=provider).update(expires_at=timezone.now())
    Token.objects.filter(provider=provider).update(expires_at=timezone.now())
    cache.name_forget("crm")
    memory.memory.clear()
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="reconnect needed"):
        get_token("crm", timeout=5)
    assert time.monotonic() - started < 1.0


def test_reconnect__a_pasted_refresh_token_clears_it(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    endpoint.live.clear()
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert state(provider).reconnect_needed
    endpoint.live.add("rt-from-console")
    provider.refresh_token = "rt-from-console"
    provider.save()  # as admin does: the save queues a refresh; run it here
    assert not state(provider).reconnect_needed
    assert refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome == (
        Outcome.STORED
    )
    assert endpoint.used[-1] == "rt-from-console"


def test_health_and_metrics__report_reconnect_needed(
    httpserver: HTTPServer, endpoint: RotatingEndpoint, admin_client: Client
) -> None:
    provider = connected(httpserver)
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert admin_client.get("/tokens/health/").status_code == 200
    endpoint.live.clear()
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    health = admin_client.get("/tokens/health/")
    assert health.status_code == 503
    (entry,) = health.json()["providers"]
    assert entry["reconnect_needed"] is True and entry["status"] == "reconnect"
    assert entry["valid"] is True  # the last token still serves meanwhile
    metrics = admin_client.get("/tokens/metrics").content.decode()
    assert 'tokens_providers{status="reconnect"} 1.0' in metrics
    assert "tokens_providers_unhealthy 1.0" in metrics
    listing = admin_client.get("/admin/tokens/provider/?status=reconnect").content.decode()
    assert "reconnect needed" in listing and ">crm<" in listing


def test_refresh__never_uses_a_rotating_refresh_token_without_the_lock(
    httpserver: HTTPServer, endpoint: RotatingEndpoint, settings: Any
) -> None:
    provider = connected(httpserver)
    settings.CACHES = {
        **settings.CACHES,
        "dead": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": "redis://127.0.0.1:1/0"},
    }
    settings.TOKENS_CACHE_ALIAS = "dead"
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.IN_FLIGHT
    assert endpoint.used == []
    assert stored_refresh_token(provider) == "rt-0"


def test_failure__the_error_never_shows_the_refresh_token(httpserver: HTTPServer) -> None:
    def echo(request: Request) -> Response:
        form = parse_qs(request.get_data(as_text=True))
        return Response(
            json.dumps(
                {"error": "invalid_request", "error_description": f"got {form['refresh_token']}"}
            ),
            status=400,
            content_type="application/json",
        )

    httpserver.expect_request("/token", method="POST").respond_with_handler(echo)
    provider = connected(httpserver)
    Provider.objects.filter(pk=provider.pk).update(refresh_token="rt-secret-value-0123456789")
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    error = state(provider).last_error
    assert "invalid_request" in error and "0123456789" not in error


def test_generator_error__carries_no_credential_in_its_text() -> None:
    error = GeneratorError("x", transient=False)
    error.refresh_token = "rt-hidden"
    assert "rt-hidden" not in repr(error) and "rt-hidden" not in str(error)


def test_provider_save__after_refresh_from_db_or_a_deferred_load_keeps_the_newest(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    reread = Provider.objects.get(pk=provider.pk)
    deferred = Provider.objects.defer("refresh_token").get(pk=provider.pk)
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)  # rt-1
    reread.refresh_from_db()
    assert deferred.refresh_token == "rt-1"  # loads the deferred field now
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)  # rt-2
    reread.save()
    deferred.refresh_interval = timedelta(minutes=9)
    deferred.save()
    assert stored_refresh_token(provider) == "rt-2"


def test_provider_save__a_pasted_refresh_token_while_disabling_beats_an_older_refresh(
    httpserver: HTTPServer, endpoint: RotatingEndpoint
) -> None:
    provider = connected(httpserver)
    in_flight = versions.fence_next(provider_id=provider.pk)  # a refresh with rt-0 began
    provider.enabled = False
    provider.refresh_token = "rt-pasted"
    provider.save()
    late = (provider, in_flight, GeneratedToken("at-x", refresh_token="rt-rotated"), timezone.now())
    versions.tokens_store_many(items=[late])
    assert stored_refresh_token(provider) == "rt-pasted"


class LateRotation(Generator):
    """A rotating grant whose issuer answers only when the test says so."""

    kind = "late_rotation"
    label = "late rotation (tests)"
    uses_refresh_token = True
    release = threading.Event()

    def generate(self, provider: Provider) -> GeneratedToken:
        assert self.release.wait(10)
        return GeneratedToken("at-late", refresh_token=f"{provider.refresh_token}-rotated")


def test_refresh__a_given_up_call_that_answers_later_still_keeps_its_rotated_refresh_token(
    settings: Any,
) -> None:
    """A batch gives up a call at its deadline; the issuer answers afterwards, having rotated
    the refresh token: the new one is kept (the late access token is not stored)."""
    settings.TOKENS_GENERATORS = {"late_rotation": f"{__name__}.LateRotation"}
    settings.TOKENS_HTTP_TIMEOUT = 0.3
    LateRotation.release.clear()
    first, second = (
        Provider.objects.create(name=name, kind="late_rotation", refresh_token=f"rt-{name}")
        for name in ("a", "b")
    )
    results = refresh.refresh_many(
        provider_ids=[first.pk, second.pk], reason=Reason.MANUAL, deadline=time.monotonic() + 0.1
    )
    assert {r.outcome for r in results.values()} == {Outcome.FAILED}
    assert "given up" in state(first).last_error
    LateRotation.release.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stored_refresh_token(second) != "rt-b-rotated":
        time.sleep(0.05)
    assert stored_refresh_token(first) == "rt-a-rotated"
    assert stored_refresh_token(second) == "rt-b-rotated"
    assert not Token.objects.filter(provider__in=[first, second]).exists()


def test_failure__an_echoed_client_assertion_never_reaches_the_error(
    httpserver: HTTPServer,
) -> None:
    """A per-request credential (here a client_secret_jwt assertion) is scrubbed like the
    secret, not merely cut by the error's length limit."""

    def echo(request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        assertion = form["client_assertion"]
        return Response(
            json.dumps({"error": "invalid_client", "error_description": assertion[:120]}),
            status=401,
            content_type="application/json",
        )

    httpserver.expect_request("/token", method="POST").respond_with_handler(echo)
    provider = Provider.objects.create(
        name="echo",
        kind="oauth2_client_credentials",
        config={
            "token_url": httpserver.url_for("/token"),
            "client_id": "c1",
            "auth_method": "client_secret_jwt",
        },
        secret=CLIENT_SECRET,
    )
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    error = state(provider).last_error
    assert "invalid_client" in error and "eyJ" not in error, error


def test_admin_form__a_new_auth_method_needs_the_secret_again(admin_client: Client) -> None:
    """A private key kept for private_key_jwt must not be posted as a client secret."""
    from tests.keys import rsa_key_pem

    provider = Provider.objects.create(
        name="signed",
        kind="oauth2_client_credentials",
        config={
            "token_url": "https://auth.example/token",
            "client_id": "c1",
            "auth_method": "private_key_jwt",
        },
        secret=rsa_key_pem(),
    )
    downgraded = {**provider.config, "auth_method": "client_secret_post"}
    response = admin_client.post(
        f"/admin/tokens/provider/{provider.pk}/change/",
        {
            "name": "signed",
            "kind": "oauth2_client_credentials",
            "enabled": "on",
            "config": json.dumps(downgraded),
            "secret": "",
            "refresh_token": "",
            "refresh_interval": "00:05:00",
            **_inline_management(),
        },
    )
    assert response.status_code == 200
    assert "Enter the secret again" in response.content.decode()
    assert Provider.objects.get(pk=provider.pk).config["auth_method"] == "private_key_jwt"
