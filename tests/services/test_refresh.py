"""The refresh service on the real database and Redis: skips, locks, failures, batches."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import redis
from django.utils import timezone
from pytest_httpserver import HTTPServer

from tests.factories import SECRET, counted_provider, make_provider, oauth2_config, state
from tests.processes import wait_for
from tokens import cache, crypto, locks
from tokens.constants import Outcome, Reason
from tokens.models import ProviderState, Token
from tokens.services import refresh, schedule

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def scheduled_batch(*, provider_ids: list[int], deadline: float) -> list[int]:
    """What the batch task asks of the service: the scheduled refresh of each provider until
    ``deadline``; the ids not begun by then."""
    results = refresh.refresh_many(
        provider_ids=provider_ids, reason=Reason.SCHEDULE, deadline=deadline
    )
    return [pid for pid in provider_ids if pid not in results]


def test_refresh__stores_token_encrypted_in_db_and_redis(redis_client: redis.Redis) -> None:
    provider = counted_provider()
    result = refresh.token_refresh(provider_id=provider.pk)
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
    cached = cache.entry_get("api")
    assert cached is not None and (cached.value, cached.version) == ("api-token-1", token.version)
    ttl = redis_client.pttl("tokens:tok:api")
    assert 290_000 < ttl <= 300_000  # from the token's expiry, not Django's 300 s default


def test_refresh__skips_the_generator_while_the_token_is_fresh(redis_client: redis.Redis) -> None:
    provider = counted_provider()
    refresh.token_refresh(provider_id=provider.pk)
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.FRESH
    assert int(redis_client.get("test:calls:api")) == 1
    assert (
        refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome
        == Outcome.STORED
    )
    assert int(redis_client.get("test:calls:api")) == 2


def test_refresh__skips_while_another_holds_the_lock(redis_client: redis.Redis) -> None:
    provider = counted_provider()
    lock = locks.lock(provider.pk)
    assert lock.acquire()
    try:
        assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.IN_FLIGHT
    finally:
        lock.release()
    assert redis_client.get("test:calls:api") is None


def test_refresh__lock_has_a_ttl(redis_client: redis.Redis, settings) -> None:
    settings.TOKENS_LOCK_TTL = 42
    lock = locks.lock(7)
    assert lock.acquire()
    assert 0 < redis_client.pttl("tokens:lock:7") <= 42_000
    lock.release()


def test_refresh__missing_or_disabled_provider_is_skipped() -> None:
    assert refresh.token_refresh(provider_id=999_999).outcome == Outcome.MISSING
    provider = counted_provider(enabled=False)
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.DISABLED


def test_refresh__keeps_history_to_the_setting(settings) -> None:
    settings.TOKENS_HISTORY = 3
    provider = counted_provider()
    for _ in range(6):
        refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
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
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.STORED
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.FAILED and result.retry_in is not None
    current = state(provider)
    assert current.consecutive_failures == 1
    assert "server_error" in current.last_error and current.last_error.startswith("transient")
    assert current.next_attempt_at > timezone.now()
    from tokens.selectors import current_token

    assert current_token(provider=provider).value == "good"
    assert cache.entry_get("api").value == "good"


def test_refresh__backoff_blocks_unforced_refreshes(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_data("down", status=503)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.FAILED
    hits = len(httpserver.log)
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.BACKOFF
    assert len(httpserver.log) == hits


def test_refresh__permanent_error_waits_for_the_schedule(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_json({"error": "invalid_client"}, status=401)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")), interval=600)
    result = refresh.token_refresh(provider_id=provider.pk)
    assert result.outcome == Outcome.FAILED and result.retry_in is None
    current = state(provider)
    assert current.permanent_error
    assert current.last_error.startswith("permanent") and "invalid_client" in current.last_error
    hits = len(httpserver.log)
    for reason in (Reason.READER, Reason.RETRY, Reason.SCHEDULE):  # a duplicate beat message
        assert (
            refresh.token_refresh(provider_id=provider.pk, reason=reason).outcome == Outcome.BACKOFF
        )
    assert len(httpserver.log) == hits
    ProviderState.objects.filter(provider=provider).update(
        last_attempt_at=timezone.now() - timedelta(seconds=600)
    )
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.FAILED  # next run
    assert (
        refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL).outcome
        == Outcome.FAILED
    )


def test_refresh__invalid_config_saved_through_the_orm_is_a_permanent_error() -> None:
    provider = make_provider(config={"client_id": "c"})
    result = refresh.token_refresh(provider_id=provider.pk)
    assert result.outcome == Outcome.FAILED
    assert "invalid provider config: token_url" in state(provider).last_error


def test_manual_refresh_that_finds_the_lock_held_is_handed_to_the_schedule(
    redis_client: redis.Redis,
) -> None:
    """The holder may be refreshing with an old config: the refresh asked for is not lost."""
    provider = counted_provider(interval=60)
    lock = locks.lock(provider.pk)
    assert lock.acquire()
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.IN_FLIGHT
    assert state(provider).next_run_at <= timezone.now()
    lock.release()
    assert schedule.due_dispatch() == [[provider.pk]]


def test_refresh_batch__refreshes_each_provider_and_stops_at_its_deadline() -> None:
    import time

    providers = [counted_provider(f"b-{i}", interval=60) for i in range(3)]
    ProviderState.objects.update(last_refresh_at=None, current_version=0)  # all due
    ids = [p.pk for p in providers]
    left = scheduled_batch(provider_ids=ids, deadline=time.monotonic() - 1)
    assert left == ids  # nothing begun after the deadline: the task hands them on
    assert scheduled_batch(provider_ids=ids, deadline=time.monotonic() + 60) == []
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
    lock = locks.lock(locked.pk)
    assert lock.acquire()
    ids = [p.pk for p in [*stored, failing, fresh, disabled, locked]] + [999_999]
    for _ in range(3):
        ProviderState.objects.filter(provider__in=stored).update(last_refresh_at=None)
        ProviderState.objects.filter(provider=failing).update(next_attempt_at=None)  # no backoff
        results = refresh.refresh_many(provider_ids=ids, reason=Reason.SCHEDULE)
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
        assert cache.entry_get(provider.name).version == current
        # history per provider: the newest TOKENS_HISTORY, the current one among them
        versions = list(Token.objects.filter(provider=provider).values_list("version", flat=True))
        assert len(versions) == 2 and max(versions) == current
    assert SECRET not in state(failing).last_error and state(failing).consecutive_failures == 3
    assert not redis_client.keys("tokens:lock:*")


def test_refresh__notices_when_the_issuer_returns_the_same_token(caplog) -> None:
    provider = make_provider("api", kind="callable", config={"path": "tests.callables.mapping"})
    refresh.token_refresh(provider_id=provider.pk)
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert "refresh got the same token again provider=api" in caplog.text
    assert "mapped" not in caplog.text


def test_refresh__readers_do_not_ask_again_during_the_backoff(
    httpserver: HTTPServer, redis_client: redis.Redis, settings
) -> None:
    httpserver.expect_request("/token").respond_with_data("down", status=503)
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    refresh.token_refresh(provider_id=provider.pk)
    remaining = (state(provider).next_attempt_at - timezone.now()).total_seconds()
    ttl = redis_client.pttl(f"tokens:pending:{provider.pk}") / 1000
    # Held through the backoff and the retry's own run (it goes on the scheduled queue), so
    # readers of a failing provider add no endpoint calls of their own.
    retry_window = settings.TOKENS_HTTP_TIMEOUT + 1
    assert remaining < ttl <= remaining + retry_window + 0.1
    assert not locks.pending_claim(provider.pk)  # a reader's request is absorbed


def test_batch__slow_endpoints_cost_one_deadline_together_not_one_each(
    settings, httpserver: HTTPServer
) -> None:
    """A scheduled batch's requests are in flight together (TOKENS_HTTP_CONCURRENCY), each within
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
        left = scheduled_batch(provider_ids=ids, deadline=time.monotonic() + 15)
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
    left = scheduled_batch(provider_ids=[stuck.pk, fine.pk], deadline=time.monotonic() + 0.3)
    took = time.monotonic() - started
    assert left == [] and took < 1.5, took
    assert Token.objects.filter(provider=fine).exists()
    assert "did not return within" in state(stuck).last_error
    assert redis_client.exists(f"tokens:lock:{stuck.pk}")  # held until its TTL
    assert not redis_client.exists(f"tokens:lock:{fine.pk}")
    # While the given-up call runs on, this process begins no second call of that provider,
    # not even once its lock has expired.
    redis_client.delete(f"tokens:lock:{stuck.pk}")
    assert refresh.token_refresh(provider_id=stuck.pk, reason=Reason.MANUAL).outcome == (
        Outcome.IN_FLIGHT
    )
    wait_for(lambda: redis_client.exists("test:done:stuck"), 10, message="the call to return")


def test_refresh__readers_ask_again_only_after_the_cooldown(
    settings, redis_client: redis.Redis
) -> None:
    settings.TOKENS_READER_COOLDOWN = 1.0
    provider = make_provider("api", kind="callable", config={"path": "tests.callables.mapping"})
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.STORED
    assert 0 < redis_client.pttl(f"tokens:pending:{provider.pk}") <= 1000
    assert not locks.pending_claim(provider.pk)  # a reader's request within the cooldown
    time.sleep(1.05)
    assert locks.pending_claim(provider.pk)


def test_task_failure__names_the_provider_without_markup() -> None:
    """A failed refresh task's message (what Flower shows) carries no character an HTML page
    could read as markup, whatever the issuer wrote."""
    from tokens.constants import Outcome
    from tokens.exceptions import RefreshFailed
    from tokens.services.results import RefreshResult
    from tokens.tasks import _failed

    provider = make_provider("api", config={"client_id": "c"})
    result = RefreshResult(Outcome.FAILED, error='transient: <img src=x onerror="alert(1)">')
    with pytest.raises(RefreshFailed) as caught:
        _failed({provider.pk: result})
    text = str(caught.value)
    assert text.startswith("api: transient:") and not set("<>&'`\"") & set(text)
