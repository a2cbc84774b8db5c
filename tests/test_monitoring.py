"""/tokens/health/ and /tokens/metrics: states, access control, nothing secret."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from tests.factories import SECRET, make_provider
from tokens import TokenUnavailable, get_token, locks, metrics, selectors, status
from tokens.constants import Reason
from tokens.models import Provider, ProviderState, Token
from tokens.services.refresh import token_refresh
from tokens.status import Status, status_of, status_q

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff(client: Client) -> Client:
    client.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    return client


# Every status at 0: what a summary says of the statuses a test did not make.
NONE = {status.value: 0 for status in Status}


def bulk_providers(
    count: int, *, status: str, prefix: str = "p", enabled: bool = True
) -> list[Provider]:
    """``count`` providers made at once (no signals, as bench/large.py does), ok (a valid
    token), failing (and still serving a valid token) or never refreshed."""
    now = timezone.now()
    providers = Provider.objects.bulk_create(
        [
            Provider(name=f"{prefix}-{i:04d}", kind="static", secret="x", enabled=enabled)
            for i in range(count)
        ]
    )
    ProviderState.objects.bulk_create(
        [
            ProviderState(provider=p)
            if status == "never"
            else ProviderState(
                provider=p,
                fence=1,
                current_version=1,
                last_refresh_at=now,
                expires_at=now + timedelta(hours=1),
                consecutive_failures=2 if status == "failing" else 0,
                last_error="transient: HTTP 503" if status == "failing" else "",
            )
            for p in providers
        ]
    )
    return providers


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
    assert body["summary"] == {
        "providers": 2,
        "by_status": {**NONE, "ok": 1, "disabled": 1},
        "needing_attention": 0,
        "making_unhealthy": 0,
    }
    # Only the providers that need attention are listed: none here.
    assert body["providers"] == [] and body["providers_not_listed"] == 0


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
    body = response.json()
    (entry,) = body["providers"]  # "a" is ok: not listed
    assert entry["name"] == "b" and entry["status"] == state and not entry["valid"]
    assert entry["enabled"] and entry["kind"] == "oauth2_client_credentials"
    assert entry["consecutive_failures"] == (1 if state == "failing" else 0)
    assert ("invalid provider config" in entry["last_error"]) == (state == "failing")
    assert body["summary"]["by_status"] == {**NONE, "ok": 1, state: 1}
    assert body["summary"]["making_unhealthy"] == body["summary"]["needing_attention"] == 1


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
    ok = ok_provider()
    first = make_provider("first", config={"client_id": "c"})  # no token yet
    held = locks.locks_acquire([ok.pk, first.pk])
    try:
        body = staff.get("/tokens/health/").json()
    finally:
        locks.locks_release(held)
    assert body["summary"]["by_status"] == {**NONE, "refreshing": 2}
    # The first token is on its way, but there is none yet: listed, as refreshing.
    assert [(p["name"], p["status"]) for p in body["providers"]] == [("first", "refreshing")]
    assert body["status"] == "unhealthy"


def test_health__a_failing_provider_still_serving_its_token_is_listed_but_healthy(
    staff: Client,
) -> None:
    provider = ok_provider("a")
    ProviderState.objects.filter(provider=provider).update(
        consecutive_failures=2, last_error="transient: HTTP 503"
    )
    response = staff.get("/tokens/health/")
    assert response.status_code == 200
    body = response.json()
    assert [(p["name"], p["status"], p["valid"]) for p in body["providers"]] == [
        ("a", "failing", True)
    ]
    assert body["summary"]["needing_attention"] == 1 and body["summary"]["making_unhealthy"] == 0


def test_health__lists_the_first_100_needing_attention_never_every_provider(
    staff: Client, django_assert_max_num_queries
) -> None:
    """At 100,000 providers health answers with a summary and a bounded list, in a fixed
    number of queries."""
    bulk_providers(300, status="ok")
    bulk_providers(130, status="failing", prefix="bad")
    bulk_providers(20, status="never", prefix="new")
    bulk_providers(5, status="ok", prefix="off", enabled=False)
    with django_assert_max_num_queries(8):
        response = staff.get("/tokens/health/")
    assert response.status_code == 503
    body = response.json()
    names = [p["name"] for p in body["providers"]]
    assert names == sorted(names) and len(names) == 100
    assert names[0] == "bad-0000" and names[-1] == "bad-0099"
    assert body["providers_not_listed"] == 50
    assert body["summary"] == {
        "providers": 455,
        "by_status": {**NONE, "ok": 300, "failing": 130, "never": 20, "disabled": 5},
        "needing_attention": 150,
        "making_unhealthy": 20,
    }


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


def providers_in_every_state() -> dict[str, Provider]:
    """A provider in each state the rules tell apart (state rows written directly)."""
    now = timezone.now()
    valid = {
        "fence": 1,
        "current_version": 1,
        "last_refresh_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    expired = {
        "fence": 1,
        "current_version": 1,
        "last_attempt_at": now,
        "last_refresh_at": now - timedelta(hours=2),
        "expires_at": now - timedelta(hours=1),
    }
    states: dict[str, dict[str, object]] = {
        "ok": valid,
        "ok-no-expiry": {**valid, "expires_at": None},
        "refreshing": valid,
        "refreshing-first": {},
        "failing-valid": {**valid, "consecutive_failures": 2},
        "failing-no-token": {"consecutive_failures": 1, "last_attempt_at": now},
        "reconnect": {**valid, "consecutive_failures": 1, "reconnect_needed": True},
        "reconnect-expired": {**expired, "consecutive_failures": 1, "reconnect_needed": True},
        "expired": expired,
        "attempted": {"last_attempt_at": now},
        "never": {},
        "no-state-row": {},
        "disabled": valid,
        "disabled-failing": {"consecutive_failures": 3},
    }
    providers = {
        name: Provider.objects.create(
            name=name, kind="static", secret="x", enabled=not name.startswith("disabled")
        )
        for name in states
    }
    for name, fields in states.items():
        ProviderState.objects.filter(provider=providers[name]).update(**fields)
    ProviderState.objects.filter(provider=providers["no-state-row"]).delete()
    return providers


@pytest.mark.parametrize("refreshes", [True, False])
def test_status__the_rules_in_python_and_as_filters_agree(refreshes: bool) -> None:
    """status_of and status_q (admin's badge and filter, health's and metrics' counts),
    needs_attention and makes_unhealthy: the same answer for every state, refreshes running
    or not."""
    providers = providers_in_every_state()
    held = locks.locks_acquire(
        [providers["refreshing"].pk, providers["refreshing-first"].pk] if refreshes else []
    )
    try:
        now = timezone.now()
        refreshing = status.refreshing_all()
        summary = selectors.provider_summary(now=now)
        expected: list[Status] = []
        attention, unhealthy, expiries = 0, 0, []
        for provider in Provider.objects.select_related("refresh_state"):
            state = provider.state_or_none
            one = Provider.objects.filter(pk=provider.pk)
            want = status_of(provider, state, refreshing=provider.pk in refreshing, now=now)
            expected.append(want)
            attention += status.needs_attention(provider, state, now=now)
            unhealthy += status.makes_unhealthy(provider, state, now=now)
            if provider.enabled and state and status.has_valid_token(state, now):
                expiries += [state.expires_at] if state.expires_at else []
            got = [s for s in Status if one.filter(status_q(s, refreshing=refreshing, now=now))]
            assert got == [want], provider.name
            assert one.filter(status.needs_attention_q(now)).exists() == status.needs_attention(
                provider, state, now=now
            ), provider.name
            assert one.filter(status.makes_unhealthy_q(now)).exists() == status.makes_unhealthy(
                provider, state, now=now
            ), provider.name
    finally:
        locks.locks_release(held)
    assert summary.by_status == {s: expected.count(s) for s in Status}
    assert (Status.REFRESHING in expected) == refreshes
    assert summary.total == len(providers)
    assert (summary.needing_attention, summary.unhealthy) == (attention, unhealthy)
    assert summary.soonest_expiry == min(expiries)


def test_status__refreshing_is_read_without_scanning_redis(
    redis_client: redis.Redis, settings
) -> None:
    """Which providers refresh now (status filter, health, metrics): the locks taken, read
    from their index, never by scanning every key (hundreds of thousands at 100,000
    providers); a holder that died is forgotten when its lock expires."""
    redis_client.mset({f"tokens:tok:p-{i}": "x" for i in range(2_000)})
    held = locks.locks_acquire([11, 12, 13])
    locks.locks_acquire([12])  # busy: not taken, still held by the first
    redis_client.config_resetstat()
    assert status.refreshing_all() == {11, 12, 13}
    assert "cmdstat_scan" not in redis_client.info("commandstats")
    locks.locks_release({pid: token for pid, token in held.items() if pid != 13})
    assert status.refreshing_all() == {13}
    settings.TOKENS_LOCK_TTL = 0.2
    locks.locks_acquire([14])  # its holder dies
    redis_client.delete("tokens:lock:13")  # expired early
    assert status.refreshing_all() == {14}
    time.sleep(0.3)
    assert status.refreshing_all() == set()
    assert redis_client.zscore("tokens:locks:held", "14") is None  # pruned


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


def test_metrics__refreshes_failures_expiry_waits_and_timeouts_per_provider(
    staff: Client, settings
) -> None:
    """With TOKENS_METRICS_PER_PROVIDER, counters and gauges have a series per provider."""
    settings.TOKENS_METRICS_PER_PROVIDER = True
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
    assert 'tokens_reconnect_needed{provider="good"} 0.0' in text
    assert "mapped" not in text


def test_metrics__by_default_no_series_per_provider(staff: Client) -> None:
    """Counters and gauges by outcome, status and the like, not by provider: the same series
    (not the same values) with 1 provider or 500."""
    for counter in (
        metrics.REFRESHES,
        metrics.REFRESH_FAILURES,
        metrics.WAITS,
        metrics.UNAVAILABLE,
        metrics.TIMEOUTS,
    ):
        counter.counter.clear()  # this process's series of the tests before
    ok_provider("good")
    bad = make_provider("bad", config={"client_id": "c"})
    token_refresh(provider_id=bad.pk)
    with pytest.raises(TokenUnavailable):
        get_token("bad", timeout=0.1)  # failing: at once
    make_provider("slow", config={"client_id": "c"})  # no refresh ran: the caller waits
    with pytest.raises(TokenUnavailable):
        get_token("slow", timeout=0.1)
    text = staff.get("/tokens/metrics").content.decode()
    for name in ("good", "bad", "slow"):
        assert f'"{name}"' not in text
    # An empty label is no label to Prometheus: one series per outcome, class or reason.
    assert 'tokens_refreshes_total{outcome="stored",provider=""}' in text
    assert 'tokens_refresh_failures_total{error_class="permanent",provider=""}' in text
    assert 'tokens_get_token_unavailable_total{provider="",reason="failing"}' in text
    assert 'tokens_get_token_waits_total{provider=""}' in text
    assert 'tokens_get_token_timeouts_total{provider=""}' in text
    assert 'tokens_providers{status="ok"} 1.0' in text
    assert 'tokens_providers{status="failing"} 1.0' in text
    assert 'tokens_providers{status="never"} 1.0' in text
    assert "tokens_providers_unhealthy 2.0" in text  # bad and slow: no token
    assert "tokens_providers_needing_attention 2.0" in text
    soonest = next(
        line
        for line in text.splitlines()
        if line.startswith("tokens_token_expiry_soonest_seconds ")
    )
    assert 0 < float(soonest.split()[1]) <= 90
    assert "tokens_token_valid" not in text and "tokens_consecutive_failures{" not in text

    def series() -> set[str]:
        page = staff.get("/tokens/metrics").content.decode()
        return {line.split(" ")[0] for line in page.splitlines() if not line.startswith("#")}

    before = series()
    bulk_providers(500, status="ok")
    bulk_providers(20, status="failing", prefix="bad")
    assert series() == before


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
