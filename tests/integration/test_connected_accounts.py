"""Connected accounts end to end against django-oauth-toolkit (tests/idp: authorization code
with PKCE required, refresh tokens rotated on every use with no reuse grace, reuse revoking the
whole grant): Connect in admin, rotation under load on real processes, and a worker killed
mid-refresh on each side of the issuer's rotation."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client

from tests.idp import IdP, start_idp, token_hash
from tests.processes import child_env, purge_queues, wait_for
from tokens import get_token, redis_client
from tokens.constants import Reason
from tokens.models import Provider, ProviderState
from tokens.queue import refresh_send
from tokens.services import refresh

pytestmark = [pytest.mark.integration]

CALLBACK = "http://testserver/tokens/connect/callback/"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    with start_idp(tmp_path_factory.mktemp("idp"), redirect_uris=[CALLBACK]) as running:
        yield running


def add_provider(idp: IdP, name: str = "crm", token_url: str | None = None) -> Provider:
    return Provider.objects.create(
        name=name,
        kind="oauth2_refresh_token",
        config={
            "authorize_url": idp.authorize_url,
            "token_url": token_url or idp.token_url,
            "client_id": idp.client_id,
            "scope": "read write",
        },
        secret=idp.client_secret,
    )


def begin(client: Client, idp: IdP, provider: Provider) -> str:
    """Click Connect: the URL of the IdP's authorization page."""
    response = client.post(f"/admin/tokens/provider/{provider.pk}/connect/")
    assert response.status_code == 302, response.content[:500]
    location = response["Location"]
    assert location.startswith(idp.authorize_url)
    return location


def callback(client: Client, url: str) -> list[str]:
    """Follow the IdP's redirect back into the app; the admin messages shown."""
    assert url.startswith(CALLBACK), url
    response = client.get(url.removeprefix("http://testserver"), follow=True)
    assert response.status_code == 200
    return [str(message) for message in response.context["messages"]]


def connect(client: Client, idp: IdP, provider: Provider) -> list[str]:
    return callback(client, idp.approve(begin(client, idp, provider)))


def state(provider: Provider) -> ProviderState:
    return ProviderState.objects.get(provider=provider)


def stored_refresh_token(provider: Provider) -> str:
    return Provider.objects.get(pk=provider.pk).refresh_token


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_connect__authorization_code_with_pkce_stores_the_grant(
    admin_client: Client, idp: IdP
) -> None:
    provider = add_provider(idp)
    authorize = begin(admin_client, idp, provider)
    query = parse_qs(urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert query["redirect_uri"] == [CALLBACK] and len(query["state"][0]) >= 32
    assert "code_verifier" not in authorize

    messages = callback(admin_client, idp.approve(authorize))
    assert messages == ["Provider crm: connected; its first token is stored."]
    exchange = idp.token_requests()[-1]
    assert exchange["grant_type"] == "authorization_code" and exchange["code_verifier"]
    assert exchange["status"] == 200 and exchange["client_auth"] == "client_secret_basic"
    first = stored_refresh_token(provider)
    assert first and state(provider).current_version > 0 and not state(provider).reconnect_needed
    assert get_token("crm")

    # A refresh rotates it, and the issuer retired the one it was sent.
    assert refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).token
    second = stored_refresh_token(provider)
    assert second != first
    rows = {row["sha256"]: row for row in idp.refresh_tokens()}
    assert rows[token_hash(first)]["revoked"] is not None
    assert rows[token_hash(second)]["revoked"] is None

    # The change page offers "Reconnect" now; the refresh token is never shown.
    page = admin_client.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    assert "Reconnect" in page and second not in page and first not in page
    assert CALLBACK in page  # the redirect URI to register


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_connect__state_is_single_use_and_bound_to_the_session(
    admin_client: Client, idp: IdP
) -> None:
    provider = add_provider(idp)
    approved = idp.approve(begin(admin_client, idp, provider))

    # Another admin's session cannot use it (no such state in their session).
    other = Client()
    other.force_login(User.objects.create_superuser("other", "o@example.com", "pw-other-123"))
    assert callback(other, approved) == [
        "Connect failed: unknown or already used state; start again."
    ]
    assert not stored_refresh_token(provider)

    assert callback(admin_client, approved) == [
        "Provider crm: connected; its first token is stored."
    ]
    assert callback(admin_client, approved) == [
        "Connect failed: unknown or already used state; start again."
    ]


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_connect__a_refusal_at_the_idp_stores_nothing(admin_client: Client, idp: IdP) -> None:
    provider = add_provider(idp)
    authorize = begin(admin_client, idp, provider)
    the_state = parse_qs(urlsplit(authorize).query)["state"][0]
    messages = callback(admin_client, f"{CALLBACK}?error=access_denied&state={the_state}")
    assert messages == ["Provider crm: the identity provider answered 'access_denied'."]
    assert not stored_refresh_token(provider)


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_connect__needs_change_permission(idp: IdP) -> None:
    provider = add_provider(idp)
    viewer = User.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_provider"),
        Permission.objects.get(codename="refresh_provider"),
    )
    client = Client()
    client.force_login(viewer)
    assert client.post(f"/admin/tokens/provider/{provider.pk}/connect/").status_code == 403
    page = client.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    assert "tokens-connect" not in page
    assert (
        client.get(f"{CALLBACK.removeprefix('http://testserver')}?code=x&state=y").status_code
        == 403
    )


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_reconnect__after_the_grant_is_revoked(admin_client: Client, idp: IdP) -> None:
    provider = add_provider(idp)
    connect(admin_client, idp, provider)
    revoked = subprocess.run(  # the person disconnects the app at the issuer
        [
            sys.executable,
            "-c",
            "import httpx,sys; r=httpx.post(sys.argv[1], data={'token': sys.argv[2], "
            "'token_type_hint': 'refresh_token'}, auth=(sys.argv[3], sys.argv[4])); "
            "print(r.status_code)",
            idp.revoke_url,
            stored_refresh_token(provider),
            idp.client_id,
            idp.client_secret,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert revoked.stdout.strip() == "200"
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.error and "reconnect needed" in result.error
    assert state(provider).reconnect_needed
    assert connect(admin_client, idp, provider) == [
        "Provider crm: connected; its first token is stored."
    ]
    assert not state(provider).reconnect_needed


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def fast_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    """Access tokens that live three seconds: a minute is twenty rotations."""
    directory = tmp_path_factory.mktemp("fast-idp")
    with start_idp(directory, access_token_seconds=3, redirect_uris=[CALLBACK]) as running:
        yield running


@pytest.mark.django_db(transaction=True)
def test_rotation_under_load__every_refresh_token_used_once(
    admin_client: Client, fast_idp: IdP, worker_factory, tmp_path: Path
) -> None:
    purge_queues()
    worker_factory(hostname="rotation", concurrency=4)
    provider = add_provider(fast_idp)
    assert connect(admin_client, fast_idp, provider) == [
        "Provider crm: connected; its first token is stored."
    ]
    client = redis.Redis.from_url(settings.REDIS_URL)
    callers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.callers", "crm", "25", "test:rotation", "10", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for _ in range(4)
    ]
    time.sleep(1.5)  # the callers have set Django up and wait for the go
    client.set("test:rotation", "1")
    outputs = [caller.communicate(timeout=120) for caller in callers]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(caller.returncode == 0 for caller in callers), [err[-2000:] for _, err in outputs]
    assert [report["errors"] for report in reports] == [[], [], [], []]
    assert sum(report["calls"] for report in reports) > 1000

    refreshes = [r for r in fast_idp.token_requests() if r["grant_type"] == "refresh_token"]
    assert len(refreshes) >= 10, "the access token should have been refreshed every few seconds"
    assert [r["status"] for r in refreshes] == [200] * len(refreshes), refreshes
    sent = [r["refresh_token_sha256"] for r in refreshes]
    assert len(set(sent)) == len(sent), "a refresh token was sent twice"
    chain = [row for row in fast_idp.refresh_tokens() if row["sha256"] in set(sent)]
    assert all(row["revoked"] is not None for row in chain)  # each used once, then retired
    assert not state(provider).reconnect_needed and not state(provider).consecutive_failures
    assert token_hash(stored_refresh_token(provider)) not in set(sent)  # the newest, unused


def lock_expired(provider: Provider) -> None:
    """The killed worker's refresh lock is gone (its TTL): a refresh sent now runs."""
    held = redis_client.key("lock", provider.pk)
    wait_for(lambda: not redis_client.client().exists(held), 10, message="the lock to expire")


class ParkingProxy:
    """A TCP proxy to the IdP that can park new connections (hold them, forward nothing):
    a refresh whose request never reached the issuer."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.parking = False
        self.parked: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.parking:
                self.parked.append(client)
                continue
            upstream = socket.create_connection(self.target, timeout=10)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def drop_parked(self) -> None:
        for sock in self.parked:
            sock.close()
        self.parked.clear()
        self.parking = False

    def close(self) -> None:
        self._listener.close()


@pytest.mark.django_db(transaction=True)
def test_worker_killed_before_the_issuer_rotated__loses_no_grant(
    admin_client: Client, idp: IdP, worker_factory
) -> None:
    purge_queues()
    host, port = urlsplit(idp.base_url).hostname, urlsplit(idp.base_url).port
    proxy = ParkingProxy((str(host), int(port or 80)))
    try:
        provider = add_provider(idp, token_url=f"http://127.0.0.1:{proxy.port}/o/token/")
        connect(admin_client, idp, provider)
        purge_queues()  # the refresh sent when the provider was added
        held = stored_refresh_token(provider)
        victim = worker_factory(hostname="victim", TOKENS_LOCK_TTL="2")
        proxy.parking = True
        refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False)
        wait_for(lambda: proxy.parked, 15, message="the refresh to reach the proxy")
        victim.kill()  # SIGKILL mid-refresh: its request never reached the issuer
        proxy.drop_parked()
        assert stored_refresh_token(provider) == held

        worker_factory(hostname="survivor", TOKENS_LOCK_TTL="2")
        lock_expired(provider)
        refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False)
        wait_for(
            lambda: stored_refresh_token(provider) != held,
            20,
            message="the survivor to refresh with the same refresh token",
        )
        refreshes = [r for r in idp.token_requests() if r["grant_type"] == "refresh_token"]
        assert refreshes[-1]["refresh_token_sha256"] == token_hash(held)
        assert refreshes[-1]["status"] == 200
        assert not state(provider).reconnect_needed
    finally:
        proxy.close()


@pytest.mark.django_db(transaction=True)
def test_worker_killed_after_the_issuer_rotated__is_the_documented_window(
    admin_client: Client, idp: IdP, worker_factory
) -> None:
    """README, "Connected accounts": the one window left. The issuer rotated and answered,
    the worker died before its commit; the refresh token tokens holds was retired, so the
    next refresh gets invalid_grant and health says "reconnect needed"."""
    purge_queues()
    provider = add_provider(idp)
    connect(admin_client, idp, provider)
    purge_queues()  # the refresh sent when the provider was added
    held = stored_refresh_token(provider)
    before = len(idp.token_requests())
    victim = worker_factory(hostname="victim", TOKENS_LOCK_TTL="2")
    idp.set_delay(after=30)
    try:
        refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False)
        wait_for(
            lambda: len(idp.token_requests()) > before,
            15,
            message="the issuer to rotate (its answer is held back)",
        )
        victim.kill()
    finally:
        idp.set_delay()
    assert stored_refresh_token(provider) == held  # nothing came back to commit

    worker_factory(hostname="survivor", TOKENS_LOCK_TTL="2")
    lock_expired(provider)
    refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False)
    wait_for(lambda: state(provider).reconnect_needed, 20, message="reconnect needed")
    assert idp.token_requests()[-1]["error"] == "invalid_grant"
    health = admin_client.get("/tokens/health/")
    assert health.status_code == 503
    (entry,) = [p for p in health.json()["providers"] if p["name"] == "crm"]
    assert entry["reconnect_needed"] is True and entry["status"] == "reconnect"


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_connect__the_session_holds_no_pkce_verifier(admin_client: Client, idp: IdP) -> None:
    """A session row (or cookie) with the state cannot redeem a leaked code: the verifier is
    derived from the state with SECRET_KEY, never stored."""
    import base64
    import hashlib

    provider = add_provider(idp)
    authorize = begin(admin_client, idp, provider)
    challenge = parse_qs(urlsplit(authorize).query)["code_challenge"][0]
    stored = json.dumps(admin_client.session.get("tokens_connect"))

    def s256(value: str) -> str:
        digest = hashlib.sha256(value.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    words = {w for w in stored.replace('"', " ").replace(",", " ").split() if len(w) >= 43}
    assert words and all(s256(word) != challenge for word in words)


@pytest.mark.django_db
@pytest.mark.usefixtures("empty_queues")
def test_connect__extra_authorize_params_are_query_data(admin_client: Client, idp: IdP) -> None:
    provider = add_provider(idp)
    provider.config = {
        **provider.config,
        "extra_authorize_params": {"uri": "x", "access_type": "offline", "prompt": "consent"},
    }
    provider.save()
    query = parse_qs(urlsplit(begin(admin_client, idp, provider)).query)
    assert query["uri"] == ["x"] and query["access_type"] == ["offline"]
    assert urlsplit(begin(admin_client, idp, provider)).path == "/o/authorize/"
