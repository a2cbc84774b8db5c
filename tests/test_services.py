"""The refresh service, invalidation and schedule sync, on the real database and Redis."""

from __future__ import annotations

import time
from datetime import timedelta
from io import StringIO

import pytest
import redis
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks
from pytest_httpserver import HTTPServer

from tests.factories import SECRET, make_provider, oauth2_config
from tests.processes import wait_for
from tokens import crypto, services, store
from tokens.models import Provider, ProviderState, Token
from tokens.services import Outcome, Reason

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def sent_batches(monkeypatch) -> list[tuple[list[int], object, object]]:
    """Batches the dispatcher sends, kept here: no worker runs in these tests, and messages left
    in the broker would reach the next test's worker. Sending is tested end to end in
    tests/integration/test_refresh_cycle.py."""
    sent: list[tuple[list[int], object, object]] = []
    monkeypatch.setattr(services, "_send_batches", sent.extend)
    return sent


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
    # The issuer echoed the secret: its description is withheld whole, the error code kept.
    assert state(provider).last_error == (
        "permanent: token endpoint answered HTTP 401 with error 'invalid_client': "
        "[the issuer's description is withheld: it echoed a credential]"
    )


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

    late = services._store(
        provider, state(provider), stale_fence, GeneratedToken(access_token="stale-token")
    )
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
    assert (
        services._store(
            provider, state(provider), inflight, GeneratedToken(access_token="old-config")
        )
        is None
    )
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


def next_run(provider: Provider):  # type: ignore[no-untyped-def]
    return state(provider).next_run_at


def set_next_run(provider: Provider, when) -> None:  # type: ignore[no-untyped-def]
    ProviderState.objects.filter(provider=provider).update(next_run_at=when)


def beat_changes():  # type: ignore[no-untyped-def]
    """What makes beat reload its whole schedule (django-celery-beat's change marker)."""
    return PeriodicTasks.last_change()


def test_dispatcher__one_beat_entry_exists_after_migrate() -> None:
    task = PeriodicTask.objects.get(name=services.DISPATCH_SCHEDULE)
    assert task.task == "tokens.dispatch_due" and task.enabled
    assert (task.interval.every, task.interval.period) == (1, IntervalSchedule.SECONDS)
    assert task.expire_seconds == 5  # a dispatch stuck behind a backlog is dropped


def test_schedule__new_provider_runs_one_interval_after_creation() -> None:
    before = timezone.now()
    provider = counted_provider(interval=30)
    after = timezone.now()
    assert before + timedelta(seconds=30) <= next_run(provider) <= after + timedelta(seconds=30)


def test_schedule__interval_edit_counts_from_the_previous_run_and_never_lies_in_the_past() -> None:
    provider = counted_provider(interval=60)
    now = timezone.now()
    set_next_run(provider, now + timedelta(seconds=50))  # the previous run was 10 s ago
    provider.refresh_interval = timedelta(seconds=30)
    provider.save()
    assert next_run(provider) == now + timedelta(seconds=20)
    provider.refresh_interval = timedelta(seconds=120)
    provider.save()
    assert next_run(provider) == now + timedelta(seconds=110)
    provider.refresh_interval = timedelta(seconds=5)  # the previous run is older than that
    provider.save()
    assert now <= next_run(provider) <= timezone.now()


def test_schedule__provider_edits_never_make_beat_reload() -> None:
    """A PeriodicTask per provider made every edit reload beat's whole schedule (#675)."""
    changes = beat_changes()
    provider = counted_provider(interval=60)
    for seconds in (30, 90):
        provider.refresh_interval = timedelta(seconds=seconds)
        provider.save()
    provider.enabled = False
    provider.save()
    provider.delete()
    assert beat_changes() == changes
    assert not PeriodicTask.objects.filter(name__startswith="tokens.refresh:").exists()


def test_refresh__never_saves_a_periodic_task() -> None:
    """Saving a PeriodicTask on every run would make beat reload its schedule every run."""
    provider = counted_provider()
    changes = beat_changes()
    for reason in (Reason.MANUAL, Reason.SCHEDULE, Reason.READER):
        services.token_refresh(provider_id=provider.pk, reason=reason)
    set_next_run(provider, timezone.now())
    services.schedule_dispatch()
    assert beat_changes() == changes


def test_dispatch__claims_due_providers_once_and_moves_each_one_interval_on() -> None:
    due = [counted_provider(f"due-{i}", interval=60) for i in range(3)]
    later = counted_provider("later", interval=60)
    now = timezone.now()
    for offset, provider in enumerate(due):
        set_next_run(provider, now - timedelta(seconds=3 - offset))
    batches = services.schedule_dispatch(now=now)
    assert batches == [[p.pk for p in due]]  # oldest first
    for offset, provider in enumerate(due):
        # on the provider's own grid: one interval after its due time, not after "now"
        assert next_run(provider) == now - timedelta(seconds=3 - offset) + timedelta(seconds=60)
    assert next_run(later) > now
    assert services.schedule_dispatch(now=now) == []  # claimed once


def test_dispatch__a_run_missed_by_more_than_an_interval_is_dropped_not_caught_up() -> None:
    provider = counted_provider(interval=60)
    now = timezone.now()
    set_next_run(provider, now - timedelta(minutes=10))  # say beat was down
    assert services.schedule_dispatch(now=now) == [[provider.pk]]
    assert next_run(provider) == now + timedelta(seconds=60)


def test_dispatch__skips_disabled_providers_and_a_re_enabled_one_starts_over() -> None:
    provider = counted_provider(interval=60)
    provider.enabled = False
    provider.save()
    set_next_run(provider, timezone.now() - timedelta(seconds=5))
    assert services.schedule_dispatch() == []
    before = timezone.now()
    provider.enabled = True
    provider.save()
    assert next_run(provider) >= before + timedelta(seconds=60)


def test_dispatch__sends_batches_of_the_setting_grouped_by_interval(settings, sent_batches) -> None:
    settings.TOKENS_DISPATCH_BATCH = 2
    now = timezone.now()
    fast = [counted_provider(f"fast-{i}", interval=10) for i in range(3)]
    slow = [counted_provider(f"slow-{i}", interval=60) for i in range(2)]
    for provider in fast + slow:
        set_next_run(provider, now)
    batches = services.schedule_dispatch(now=now)
    assert sorted(map(sorted, batches)) == sorted(
        [sorted(p.pk for p in fast[:2]), [fast[2].pk], sorted(p.pk for p in slow)]
    )
    # each batch expires after its providers' interval: by then their next run is claimed
    fast_ids = {p.pk for p in fast}
    for ids, _, interval in sent_batches:
        assert interval == timedelta(seconds=10 if set(ids) <= fast_ids else 60)
    assert sorted(map(sorted, (ids for ids, _, _ in sent_batches))) == sorted(map(sorted, batches))


@pytest.mark.django_db(transaction=True)
def test_dispatch__two_dispatchers_never_claim_one_provider(sent_batches) -> None:
    """Two beats (or a slow dispatch and the next) run at once: each provider is sent once."""
    import threading

    from django.db import connection

    providers = Provider.objects.bulk_create(
        [Provider(name=f"p-{i}", kind="static", secret="x") for i in range(300)]
    )
    services.schedules_sync_all()
    ProviderState.objects.update(next_run_at=timezone.now() - timedelta(seconds=1))
    barrier = threading.Barrier(3)
    claimed: list[list[list[int]]] = []

    def dispatch() -> None:
        barrier.wait()
        try:
            for _ in range(3):
                claimed.append(services.schedule_dispatch())
        finally:
            connection.close()

    threads = [threading.Thread(target=dispatch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ids = [pid for batches in claimed for batch in batches for pid in batch]
    assert sorted(ids) == sorted(p.pk for p in providers)  # all of them, none twice
    assert sorted(pid for batch, _, _ in sent_batches for pid in batch) == sorted(ids)


def test_manual_refresh_that_finds_the_lock_held_is_handed_to_the_schedule(
    redis_client: redis.Redis,
) -> None:
    """The holder may be refreshing with an old config: the refresh asked for is not lost."""
    provider = counted_provider(interval=60)
    lock = store.refresh_lock(provider.pk)
    assert lock.acquire()
    result = services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.IN_FLIGHT
    assert next_run(provider) <= timezone.now()
    lock.release()
    assert services.schedule_dispatch() == [[provider.pk]]


def test_refresh_batch__refreshes_each_provider_and_stops_at_its_deadline() -> None:
    import time

    providers = [counted_provider(f"b-{i}", interval=60) for i in range(3)]
    ProviderState.objects.update(last_refresh_at=None, current_version=0)  # all due
    ids = [p.pk for p in providers]
    left = services.refresh_batch(provider_ids=ids, deadline=time.monotonic() - 1)
    assert left == ids  # nothing begun after the deadline: the task hands them on
    assert services.refresh_batch(provider_ids=ids, deadline=time.monotonic() + 60) == []
    assert all(state(p).current_version > 0 for p in providers)


def test_refresh_many__each_provider_gets_its_own_outcome_in_one_batch(
    redis_client: redis.Redis, settings
) -> None:
    """Stored, failed, fresh, disabled, locked elsewhere and deleted, side by side: one
    provider's outcome never leaks into another's, and every lock is given back."""
    settings.TOKENS_HISTORY = 2
    stored = [counted_provider(f"ok-{i}") for i in range(12)]  # more than one store group
    failing = make_provider("failing", kind="callable", config={"path": "tests.callables.explodes"})
    fresh = counted_provider("fresh")
    disabled = counted_provider("off", enabled=False)
    locked = counted_provider("locked")
    ProviderState.objects.exclude(provider=fresh).update(last_refresh_at=None, current_version=0)
    lock = store.refresh_lock(locked.pk)
    assert lock.acquire()
    ids = [p.pk for p in [*stored, failing, fresh, disabled, locked]] + [999_999]
    for _ in range(3):
        ProviderState.objects.filter(provider__in=stored).update(last_refresh_at=None)
        ProviderState.objects.filter(provider=failing).update(next_attempt_at=None)  # no backoff
        results = services.refresh_many(ids, reason=Reason.SCHEDULE)
    lock.release()
    assert {p.pk: results[p.pk].outcome for p in stored} == dict.fromkeys(
        [p.pk for p in stored], Outcome.STORED
    )
    assert results[failing.pk].outcome == Outcome.FAILED
    assert results[fresh.pk].outcome == Outcome.FRESH
    assert results[disabled.pk].outcome == Outcome.DISABLED
    assert results[locked.pk].outcome == Outcome.IN_FLIGHT
    assert results[999_999].outcome == Outcome.MISSING
    for provider in stored:
        current = state(provider).current_version
        assert store.get(provider.name).version == current
        # history per provider: the newest TOKENS_HISTORY, the current one among them
        versions = list(Token.objects.filter(provider=provider).values_list("version", flat=True))
        assert len(versions) == 2 and max(versions) == current
    assert SECRET not in state(failing).last_error and state(failing).consecutive_failures == 3
    assert not redis_client.keys("tokens:lock:*")


def test_sync_token_schedules__schedules_bulk_created_providers_spread_over_the_interval() -> None:
    PeriodicTask.objects.filter(name=services.DISPATCH_SCHEDULE).delete()
    legacy = services.interval_schedule(timedelta(seconds=10))
    PeriodicTask.objects.create(
        name="tokens.refresh:old", task="tokens.refresh_token", interval=legacy
    )
    providers = Provider.objects.bulk_create(  # no signals, no state, no schedule
        [
            Provider(name=f"bulk-{i}", kind="static", secret="x", refresh_interval=timedelta(60))
            for i in range(100)
        ]
    )
    before = timezone.now()
    out = StringIO()
    call_command("sync_token_schedules", stdout=out)
    assert "100 created" in out.getvalue()
    assert PeriodicTask.objects.filter(name=services.DISPATCH_SCHEDULE).exists()
    assert not PeriodicTask.objects.filter(name__startswith="tokens.refresh:").exists()
    offsets = sorted(
        (next_run(p) - before).total_seconds() / timedelta(60).total_seconds() for p in providers
    )
    assert offsets[0] >= 0 and offsets[-1] < 1.01
    # spread: every tenth of the interval holds some of them
    assert {int(offset * 10) for offset in offsets} >= set(range(10))
    out = StringIO()
    call_command("sync_token_schedules", stdout=out)
    assert "0 created, 0 updated, 100 unchanged" in out.getvalue()


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


def test_refresh__notices_when_the_issuer_returns_the_same_token(caplog) -> None:
    provider = make_provider("api", kind="callable", config={"path": "tests.callables.mapping"})
    services.token_refresh(provider_id=provider.pk)
    services.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert "refresh got the same token again provider=api" in caplog.text
    assert "mapped" not in caplog.text


def test_refresh__readers_do_not_ask_again_during_the_backoff(
    httpserver: HTTPServer, redis_client: redis.Redis, settings
) -> None:
    httpserver.expect_request("/token").respond_with_data("down", status=503)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    services.token_refresh(provider_id=provider.pk)
    remaining = (state(provider).next_attempt_at - timezone.now()).total_seconds()
    ttl = redis_client.pttl(f"tokens:pending:{provider.pk}") / 1000
    # Held through the backoff and the retry's own run (it goes on the scheduled queue), so
    # readers of a failing provider add no endpoint calls of their own.
    retry_window = settings.TOKENS_HTTP_TIMEOUT + 1
    assert remaining < ttl <= remaining + retry_window + 0.1
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


def test_batch__slow_endpoints_cost_one_deadline_together_not_one_each(
    settings, httpserver: HTTPServer
) -> None:
    """A scheduled batch calls its generators TOKENS_REFRESH_CONCURRENCY at a time, each within
    its own deadline: four hanging endpoints cost the batch one deadline, and the healthy
    provider among them is stored."""
    from tests.hostile import HostileEndpoint, trickle

    settings.TOKENS_HTTP_TIMEOUT = 1.0
    hanging = [HostileEndpoint(trickle(0.2, total=10)) for _ in range(4)]
    try:
        slow = [
            make_provider(f"slow-{i}", config=oauth2_config(e.url)) for i, e in enumerate(hanging)
        ]
        httpserver.expect_request("/token").respond_with_json(
            {"access_token": "healthy-1", "expires_in": 300}
        )
        healthy = make_provider("healthy", config=oauth2_config(httpserver.url_for("/token")))
        ids = [p.pk for p in slow] + [healthy.pk]
        started = time.monotonic()
        left = services.refresh_batch(provider_ids=ids, deadline=time.monotonic() + 15)
        took = time.monotonic() - started
    finally:
        for endpoint in hanging:
            endpoint.close()
    assert left == []
    assert 1.0 <= took < 1.9, took  # one deadline, not four
    assert Token.objects.get(provider=healthy).value == "healthy-1"
    for provider in slow:
        assert "did not answer within 1s" in state(provider).last_error


def test_batch__a_callable_that_hangs_is_given_up_and_keeps_its_lock(
    settings, redis_client: redis.Redis
) -> None:
    """A call still running HTTP_TIMEOUT after the batch's budget is reported failed, and its
    provider's lock is kept until it expires, so no second call can overlap the first."""
    settings.TOKENS_HTTP_TIMEOUT = 0.5
    redis_client.set("test:sleep:stuck", "2")
    stuck = make_provider("stuck", kind="callable", config={"path": "tests.callables.sleeps"})
    fine = make_provider("fine", kind="callable", config={"path": "tests.callables.mapping"})
    started = time.monotonic()
    left = services.refresh_batch(provider_ids=[stuck.pk, fine.pk], deadline=time.monotonic() + 0.3)
    took = time.monotonic() - started
    assert left == [] and took < 1.5, took
    assert Token.objects.filter(provider=fine).exists()
    assert "did not return within" in state(stuck).last_error
    assert redis_client.exists(f"tokens:lock:{stuck.pk}")  # held until its TTL
    assert not redis_client.exists(f"tokens:lock:{fine.pk}")
    # While the given-up call runs on, this process begins no second call of that provider,
    # not even once its lock has expired.
    redis_client.delete(f"tokens:lock:{stuck.pk}")
    assert services.token_refresh(provider_id=stuck.pk, reason=Reason.MANUAL).outcome == (
        Outcome.IN_FLIGHT
    )
    wait_for(lambda: redis_client.exists("test:done:stuck"), 10, message="the call to return")


def test_refresh__readers_ask_again_only_after_the_cooldown(
    settings, redis_client: redis.Redis
) -> None:
    settings.TOKENS_READER_COOLDOWN = 1.0
    provider = make_provider("api", kind="callable", config={"path": "tests.callables.mapping"})
    assert services.token_refresh(provider_id=provider.pk).outcome == Outcome.STORED
    assert 0 < redis_client.pttl(f"tokens:pending:{provider.pk}") <= 1000
    assert not store.mark_pending(provider.pk)  # a reader's request within the cooldown
    time.sleep(1.05)
    assert store.mark_pending(provider.pk)
