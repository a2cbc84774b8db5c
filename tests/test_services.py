"""The refresh service, invalidation and schedule sync, on the real database and Redis."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
import redis
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from pytest_httpserver import HTTPServer

from tests.factories import SECRET, make_provider, oauth2_config
from tokens import crypto, services, store
from tokens.models import Provider, ProviderState, Token
from tokens.services import Outcome, Reason

pytestmark = pytest.mark.django_db


def counted_provider(name: str = "api", **kwargs: object) -> Provider:
    return make_provider(
        name, kind="callable", config={"path": "tests.callables.counted"}, **kwargs
    )


def state(provider: Provider) -> ProviderState:
    return ProviderState.objects.get(provider=provider)


def test_refresh__stores_token_encrypted_in_db_and_redis(redis_client: redis.Redis) -> None:
    provider = counted_provider()
    result = services.token_refresh(provider_id=provider.pk)
    assert result.outcome == Outcome.STORED
    token = Token.objects.get(provider=provider)
    assert token.value == "api-token-1"
    assert token.version == state(provider).current_version
    assert (
        token.fingerprint == crypto.fingerprint("api-token-1")
        and "api-token" not in token.fingerprint
    )
    raw = redis_client.get("tokens:tok:api")
    assert raw is not None and b"api-token-1" not in raw
    cached = store.get("api")
    assert cached is not None and (cached.value, cached.version) == ("api-token-1", token.version)
    ttl = redis_client.pttl("tokens:tok:api")
    assert 290_000 < ttl <= 300_000  # from the token's expiry, not Django's 300 s default


def test_refresh__skips_the_generator_while_the_token_is_fresh(redis_client: redis.Redis) -> None:
    provider = counted_provider()
    services.token_refresh(provider_id=provider.pk)
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.FRESH
    assert int(redis_client.get("test:calls:api")) == 1
    assert (
        services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome
        == Outcome.STORED
    )
    assert int(redis_client.get("test:calls:api")) == 2


def test_refresh__skips_while_another_holds_the_lock(redis_client: redis.Redis) -> None:
    provider = counted_provider()
    lock = store.refresh_lock(provider.pk)
    assert lock.acquire()
    try:
        assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.IN_FLIGHT
    finally:
        lock.release()
    assert redis_client.get("test:calls:api") is None


def test_refresh__lock_has_a_ttl(redis_client: redis.Redis, settings) -> None:
    settings.TOKENS_LOCK_TTL = 42
    lock = store.refresh_lock(7)
    assert lock.acquire()
    assert 0 < redis_client.pttl("tokens:lock:7") <= 42_000
    lock.release()


def test_refresh__missing_or_disabled_provider_is_skipped() -> None:
    assert services.token_refresh(provider_id=999_999).outcome == Outcome.MISSING
    provider = counted_provider(enabled=False)
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.DISABLED


def test_refresh__keeps_history_to_the_setting(settings) -> None:
    settings.TOKENS_HISTORY = 3
    provider = counted_provider()
    for _ in range(6):
        services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    versions = list(Token.objects.filter(provider=provider).values_list("version", flat=True))
    assert len(versions) == 3
    assert max(versions) == state(provider).current_version


def test_refresh__keeps_last_good_token_when_endpoint_fails(httpserver: HTTPServer) -> None:
    httpserver.expect_ordered_request("/token").respond_with_json(
        {"access_token": "good", "expires_in": 600}
    )
    httpserver.expect_ordered_request("/token").respond_with_json(
        {"error": "server_error"}, status=500
    )
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.STORED
    result = services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.FAILED and result.retry_in is not None
    current = state(provider)
    assert current.consecutive_failures == 1
    assert "server_error" in current.last_error and current.last_error.startswith("transient")
    assert current.next_attempt_at > timezone.now()
    from tokens.selectors import current_token

    assert current_token(provider=provider).value == "good"
    assert store.get("api").value == "good"


def test_refresh__transient_failures_back_off_exponentially_with_a_cap(settings) -> None:
    settings.TOKENS_RETRY_BASE = 1
    settings.TOKENS_RETRY_MAX = 20
    delays = [services.retry_delay(failures) for failures in range(1, 10)]
    for failures, delay in enumerate(delays, start=1):
        upper = min(20, 2 ** (failures - 1))
        assert upper / 2 <= delay <= upper
    assert services.retry_delay(1, retry_after=7) >= 7
    assert services.retry_delay(1, retry_after=10_000) <= 20


def test_refresh__backoff_blocks_unforced_refreshes(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_data("down", status=503)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.FAILED
    hits = len(httpserver.log)
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.BACKOFF
    assert len(httpserver.log) == hits


def test_refresh__permanent_error_waits_for_the_schedule(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_json({"error": "invalid_client"}, status=401)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")), interval=600)
    result = services.token_refresh(provider_id=provider.pk)
    assert result.outcome == Outcome.FAILED and result.retry_in is None
    current = state(provider)
    assert current.permanent_error
    assert current.last_error.startswith("permanent") and "invalid_client" in current.last_error
    hits = len(httpserver.log)
    for reason in (Reason.READER, Reason.RETRY, Reason.SCHEDULE):  # a duplicate beat message
        assert (
            services.token_refresh(provider_id=provider.pk, reason=reason).outcome
            == Outcome.BACKOFF
        )
    assert len(httpserver.log) == hits
    ProviderState.objects.filter(provider=provider).update(
        last_attempt_at=timezone.now() - timedelta(seconds=600)
    )
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.FAILED  # next run
    assert (
        services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome
        == Outcome.FAILED
    )


def test_refresh__error_text_never_holds_the_secret(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_json(
        {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}, status=401
    )
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    result = services.token_refresh(provider_id=provider.pk)
    assert SECRET not in str(result.error)
    assert SECRET not in state(provider).last_error
    assert "[redacted]" in state(provider).last_error


def test_refresh__invalid_config_saved_through_the_orm_is_a_permanent_error() -> None:
    provider = make_provider(config={"client_id": "c"})
    result = services.token_refresh(provider_id=provider.pk)
    assert result.outcome == Outcome.FAILED
    assert "invalid provider config: token_url" in state(provider).last_error


def test_refresh__stale_fence_never_replaces_a_newer_token() -> None:
    """A refresh holding an older version that stores late is discarded, in DB and cache."""
    provider = counted_provider()
    stale_fence = services._next_fence(provider.pk)  # a slow refresh got this version...
    services.token_refresh(provider_id=provider.pk)  # ...then a newer refresh stored
    newer = state(provider).current_version
    assert newer > stale_fence
    from tokens.generators import GeneratedToken

    late = services._store(provider, stale_fence, GeneratedToken(access_token="stale-token"))
    assert late is None
    assert state(provider).current_version == newer
    assert not Token.objects.filter(version=stale_fence).exists()
    assert store.get("api").version == newer and store.get("api").value == "api-token-1"


def test_store__redis_refuses_an_older_version_even_without_the_db() -> None:
    now = 1e10
    newer = store.CachedToken(1, 5, "new", "Bearer", None, None)
    older = store.CachedToken(1, 4, "old", "Bearer", None, None)
    assert store.put("x", newer, now=0, publish=False)
    assert not store.put("x", older, now=0, publish=False)
    assert store.get("x").value == "new"
    assert store.put("x", newer, now=0, publish=False)  # the same version may be put back
    assert not store.put(
        "x", store.CachedToken(1, 6, "late", "Bearer", now - 1, None), now=now, publish=False
    )


def test_config_change_voids_the_old_token_and_fences_inflight_refreshes() -> None:
    provider = counted_provider()
    services.token_refresh(provider_id=provider.pk)
    inflight = services._next_fence(provider.pk)  # a refresh minted with the old config
    provider.config = {"path": "tests.callables.mapping"}
    provider.save()
    assert store.get("api") is None
    from tokens.generators import GeneratedToken
    from tokens.selectors import current_token

    assert current_token(provider=provider) is None
    assert services._store(provider, inflight, GeneratedToken(access_token="old-config")) is None
    assert store.get("api") is None
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.STORED
    assert current_token(provider=provider).value == "mapped"


def test_config_change_resets_failures() -> None:
    provider = make_provider(config={"client_id": "c"})
    services.token_refresh(provider_id=provider.pk)
    assert state(provider).consecutive_failures == 1
    provider.config = {"path": "tests.callables.mapping"}
    provider.kind = "callable"
    provider.save()
    assert state(provider).consecutive_failures == 0 and state(provider).last_error == ""


def test_saving_a_stale_instance_never_moves_the_fence_back() -> None:
    provider = counted_provider()
    copy = Provider.objects.get(pk=provider.pk)
    services.token_refresh(provider_id=provider.pk)
    version = state(provider).current_version
    copy.refresh_interval = timedelta(seconds=60)
    copy.save()
    assert state(provider).current_version == version
    assert store.get("api").version == version


# ---------------------------------------------------------------------------- schedule


def periodic(name: str) -> PeriodicTask:
    return PeriodicTask.objects.get(name=f"tokens.refresh:{name}")


def test_schedule__follows_create_edit_disable_rename_delete() -> None:
    provider = counted_provider(interval=30)
    task = periodic("api")
    assert task.task == "tokens.refresh_token"
    assert json.loads(task.args) == [provider.pk]
    assert (task.interval.every, task.interval.period) == (30, IntervalSchedule.SECONDS)
    assert task.expire_seconds == 30 and task.enabled

    provider.refresh_interval = timedelta(seconds=45)
    provider.save()
    assert periodic("api").interval.every == 45 and periodic("api").expire_seconds == 45

    provider.enabled = False
    provider.save()
    assert not periodic("api").enabled

    provider.name = "renamed"
    provider.save()
    assert not PeriodicTask.objects.filter(name="tokens.refresh:api").exists()
    assert periodic("renamed").pk == task.pk

    provider.delete()
    assert not PeriodicTask.objects.filter(name__startswith="tokens.refresh:").exists()


def test_schedule__interval_rows_are_shared() -> None:
    for name in ("a", "b", "c"):
        counted_provider(name, interval=60)
    assert IntervalSchedule.objects.filter(every=60, period="seconds").count() == 1


def test_schedule__duplicate_interval_rows_do_not_break_sync() -> None:
    IntervalSchedule.objects.create(every=90, period="seconds")
    IntervalSchedule.objects.create(every=90, period="seconds")
    counted_provider(interval=90)
    assert periodic("api").interval.every == 90


def test_schedule__unchanged_provider_does_not_touch_its_task() -> None:
    provider = counted_provider()
    before = periodic("api").date_changed
    assert services.schedule_sync(provider=provider) == "unchanged"
    assert periodic("api").date_changed == before


def test_sync_token_schedules__reconciles_and_reports() -> None:
    provider = counted_provider()
    Provider.objects.filter(pk=provider.pk).update(
        refresh_interval=timedelta(seconds=77)
    )  # no signal
    PeriodicTask.objects.filter(name="tokens.refresh:api").delete()
    orphan_interval = services.interval_schedule(timedelta(seconds=10))
    PeriodicTask.objects.create(
        name="tokens.refresh:gone", task="tokens.refresh_token", interval=orphan_interval
    )
    out = StringIO()
    call_command("sync_token_schedules", stdout=out)
    assert "created: api" in out.getvalue() and "removed: gone" in out.getvalue()
    assert periodic("api").interval.every == 77
    out = StringIO()
    call_command("sync_token_schedules", stdout=out)
    assert "0 created, 0 updated, 0 removed, 1 unchanged" in out.getvalue()


def test_refresh_token_command__prints_fingerprint_and_only_shows_the_token_when_asked() -> None:
    counted_provider()
    out = StringIO()
    call_command("refresh_token", "api", stdout=out)
    assert "fingerprint" in out.getvalue() and "api-token" not in out.getvalue()
    out = StringIO()
    call_command("refresh_token", "api", "--show", stdout=out)
    assert "api-token-2" in out.getvalue()
    with pytest.raises(CommandError, match="no token provider named 'nope'"):
        call_command("refresh_token", "nope")


def test_refresh__never_saves_its_own_periodic_task() -> None:
    """Saving the PeriodicTask on every run would make beat reload its schedule every run."""
    provider = counted_provider()
    before = periodic("api").date_changed
    for _ in range(3):
        services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert periodic("api").date_changed == before


def test_refresh__notices_when_the_issuer_returns_the_same_token(caplog) -> None:
    provider = make_provider("api", kind="callable", config={"path": "tests.callables.mapping"})
    services.token_refresh(provider_id=provider.pk)
    services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert "refresh got the same token again provider=api" in caplog.text
    assert "mapped" not in caplog.text


def test_refresh__readers_do_not_ask_again_during_the_backoff(
    httpserver: HTTPServer, redis_client: redis.Redis
) -> None:
    httpserver.expect_request("/token").respond_with_data("down", status=503)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    services.token_refresh(provider_id=provider.pk)
    remaining = (state(provider).next_attempt_at - timezone.now()).total_seconds()
    ttl = redis_client.pttl(f"tokens:pending:{provider.pk}") / 1000
    assert 0 < ttl <= remaining + 0.1
    assert not store.mark_pending(provider.pk)  # a reader's request is absorbed


def test_another_cache_alias_keeps_tokens_out_of_the_default_cache(
    settings, redis_client: redis.Redis
) -> None:
    from project.testing import redis_db, redis_url_with_db

    url = redis_url_with_db(settings.REDIS_URL, redis_db(settings.REDIS_URL) + 2)
    settings.CACHES = {
        **settings.CACHES,
        "tokens": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": url},
    }
    settings.TOKENS_CACHE_ALIAS = "tokens"
    other = redis.Redis.from_url(url)
    other.flushdb()
    try:
        provider = counted_provider()
        services.token_refresh(provider_id=provider.pk)
        assert other.exists("tokens:tok:api")
        assert not redis_client.exists("tokens:tok:api")
        assert store.get("api").value == "api-token-1"
    finally:
        other.flushdb()
