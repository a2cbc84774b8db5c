"""/tokens/health/ and /tokens/metrics: states, access control, nothing secret."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from tests.factories import SECRET, make_provider
from tokens import TokenUnavailable, get_token, locks
from tokens.constants import Reason
from tokens.models import Provider, ProviderState, Token
from tokens.services.refresh import token_refresh
from tokens.status import Status, status_of

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


def ok_provider(name: str = "api") -> Provider:
    provider = make_provider(name, kind="callable", config={"path": "tests.callables.mapping"})
    token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    return provider


def test_health__200_when_every_enabled_provider_has_a_valid_token(staff: Client) -> None:
    ok_provider("a")
    make_provider("off", kind="static", secret="x", enabled=False)
    response = staff.get("/tokens/health/")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    by_name = {p["name"]: p for p in body["providers"]}
    assert by_name["a"]["status"] == "ok" and by_name["a"]["valid"]
    assert 0 < by_name["a"]["expires_in_seconds"] <= 90
    assert by_name["off"]["status"] == "disabled"


@pytest.mark.parametrize("state", ["never", "expired", "failing"])
def test_health__503_when_a_provider_has_no_valid_token(staff: Client, state: str) -> None:
    ok_provider("a")
    provider = make_provider("b", config={"client_id": "c"})  # invalid: refreshes fail
    if state == "expired":
        ProviderState.objects.filter(provider=provider).update(
            last_refresh_at=timezone.now() - timedelta(hours=2),
            expires_at=timezone.now() - timedelta(hours=1),
            current_version=1,
            last_attempt_at=timezone.now(),
        )
    if state == "failing":
        token_refresh(provider_id=provider.pk)
    response = staff.get("/tokens/health/")
    assert response.status_code == 503
    by_name = {p["name"]: p for p in response.json()["providers"]}
    assert by_name["b"]["status"] == state and not by_name["b"]["valid"]


@pytest.mark.parametrize("problem", ["dispatcher disabled", "dispatcher missing", "overdue"])
def test_health__503_when_the_schedule_does_not_run(staff: Client, problem: str) -> None:
    """Tokens may still be valid, but nothing will refresh them on time: say so."""
    from django_celery_beat.models import PeriodicTask

    provider = ok_provider("a")
    body = staff.get("/tokens/health/").json()
    assert body["schedule"] == {
        "dispatcher": "ok",
        "overdue_providers": 0,
        "oldest_overdue_since": None,
    }
    entry = PeriodicTask.objects.get(name="tokens.dispatch")
    if problem == "dispatcher disabled":
        entry.enabled = False
        entry.save()
    elif problem == "dispatcher missing":
        entry.delete()
    else:
        ProviderState.objects.filter(provider=provider).update(
            next_run_at=timezone.now() - timedelta(minutes=5)
        )
    response = staff.get("/tokens/health/")
    assert response.status_code == 503
    schedule = response.json()["schedule"]
    if problem == "overdue":
        assert schedule["overdue_providers"] == 1 and schedule["oldest_overdue_since"]
    else:
        assert schedule["dispatcher"] == problem.split()[1]
    text = staff.get("/tokens/metrics").content.decode()
    assert "tokens_schedule_overdue_providers" in text
    assert "tokens_schedule_dispatcher_enabled" in text


def test_health__shows_refreshing_while_the_lock_is_held(staff: Client) -> None:
    provider = ok_provider()
    lock = locks.lock(provider.pk)
    assert lock.acquire()
    try:
        body = staff.get("/tokens/health/").json()
    finally:
        lock.release()
    assert body["providers"][0]["status"] == "refreshing"


def test_status__every_badge_state() -> None:
    now = timezone.now()
    provider = Provider(name="p", enabled=True)
    fresh = ProviderState(
        current_version=1, last_refresh_at=now, expires_at=now + timedelta(minutes=5)
    )
    assert status_of(provider, fresh, refreshing=False, now=now) == Status.OK
    assert status_of(provider, fresh, refreshing=True, now=now) == Status.REFRESHING
    assert status_of(provider, ProviderState(), refreshing=False, now=now) == Status.NEVER
    assert status_of(provider, None, refreshing=False, now=now) == Status.NEVER
    failing = ProviderState(current_version=1, last_refresh_at=now, consecutive_failures=2)
    assert status_of(provider, failing, refreshing=False, now=now) == Status.FAILING
    expired = ProviderState(
        current_version=1,
        last_refresh_at=now - timedelta(hours=1),
        expires_at=now - timedelta(minutes=1),
        last_attempt_at=now,
    )
    assert status_of(provider, expired, refreshing=False, now=now) == Status.EXPIRED
    assert (
        status_of(Provider(name="d", enabled=False), fresh, refreshing=False, now=now)
        == Status.DISABLED
    )


def test_health__reveals_no_token_fingerprint_or_secret(staff: Client) -> None:
    provider = make_provider("api", kind="static", secret=SECRET)
    token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    token = Token.objects.get(provider=provider)
    text = staff.get("/tokens/health/").content.decode()
    assert SECRET not in text and token.fingerprint not in text and token.value not in text


@pytest.mark.parametrize("url", ["/tokens/health/", "/tokens/metrics"])
def test_monitoring__access_control(client: Client, settings, url: str) -> None:
    ok_provider()
    settings.TOKENS_MONITORING_ACCESS = "staff"
    assert client.get(url).status_code == 403
    User.objects.create_user("plain", password="pw")
    client.login(username="plain", password="pw")
    assert client.get(url).status_code == 403
    client.logout()
    # Staff is not enough: provider names and errors are what view_provider shows in admin.
    staff_only = User.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff_only)
    assert client.get(url).status_code == 403
    staff_only.user_permissions.add(Permission.objects.get(codename="view_provider"))
    client.force_login(User.objects.get(pk=staff_only.pk))  # permissions are cached per object
    assert client.get(url).status_code == 200
    client.logout()

    settings.TOKENS_MONITORING_ACCESS = "key"
    settings.TOKENS_MONITORING_KEY = "monitor-key-123"
    assert client.get(url).status_code == 403
    assert client.get(url, HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get(url, HTTP_AUTHORIZATION="Bearer monitor-key-123").status_code == 200
    settings.TOKENS_MONITORING_KEY = ""
    assert client.get(url, HTTP_AUTHORIZATION="Bearer ").status_code == 403  # no key: closed

    settings.TOKENS_MONITORING_ACCESS = "open"
    assert client.get(url).status_code == 200


def test_metrics__refreshes_failures_expiry_waits_and_timeouts(staff: Client) -> None:
    ok_provider("good")
    bad = make_provider("bad", config={"client_id": "c"})
    token_refresh(provider_id=bad.pk)
    with pytest.raises(TokenUnavailable):
        get_token("bad", timeout=0.1)  # failing: at once
    make_provider("slow", config={"client_id": "c"})  # no refresh ran: the caller waits
    with pytest.raises(TokenUnavailable):
        get_token("slow", timeout=0.1)
    text = staff.get("/tokens/metrics").content.decode()
    assert 'tokens_refreshes_total{outcome="stored",provider="good"}' in text
    assert 'tokens_refresh_failures_total{error_class="permanent",provider="bad"}' in text
    assert 'tokens_refresh_duration_seconds_count{kind="static"}' in text
    assert 'tokens_token_expiry_seconds{provider="good"}' in text
    assert 'tokens_token_valid{provider="bad"} 0.0' in text
    assert 'tokens_consecutive_failures{provider="bad"} 1.0' in text
    assert 'tokens_get_token_unavailable_total{provider="bad",reason="failing"} 1.0' in text
    assert 'tokens_get_token_waits_total{provider="slow"}' in text
    assert 'tokens_get_token_timeouts_total{provider="slow"}' in text
    assert "mapped" not in text


def test_metrics__only_tokens_own_series(staff: Client) -> None:
    """Not Flower's counters, nor the client library's process and GC collectors, that share
    the default registry of the process."""
    from prometheus_client import REGISTRY, Counter

    ok_provider("a")
    foreign = Counter("flower_events_total", "Flower's, say.", registry=REGISTRY)
    foreign.inc()
    try:
        text = staff.get("/tokens/metrics").content.decode()
    finally:
        REGISTRY.unregister(foreign)
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names and all(name.startswith("tokens_") for name in names), names
    assert "tokens_refreshes_total" in text


def test_monitoring__one_url_each_the_other_redirects(staff: Client) -> None:
    health = staff.get("/tokens/health?x=1")
    assert health.status_code in (301, 302) and health["Location"] == "/tokens/health/?x=1"
    metrics = staff.get("/tokens/metrics/")
    assert metrics.status_code in (301, 302) and metrics["Location"] == "/tokens/metrics"


def test_health__503_is_not_logged_as_a_server_error(
    staff: Client, caplog: pytest.LogCaptureFixture
) -> None:
    make_provider("b", config={"client_id": "c"})  # never gets a token
    with caplog.at_level("WARNING", logger="django.request"):
        assert staff.get("/tokens/health/").status_code == 503
    assert not [r for r in caplog.records if r.name == "django.request"], caplog.text
