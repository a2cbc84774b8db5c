"""get_token() in this process, against the real Redis and database (refreshes run in-test)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import redis
from django.db import connection
from django.utils import timezone

from tests.factories import counted_provider, make_provider
from tests.processes import purge_queues, wait_for
from tokens import (
    ProviderDisabled,
    TokenError,
    TokenUnavailable,
    UnknownProvider,
    api,
    cache,
    get_token,
    memory,
    selectors,
)
from tokens.cache import CachedToken
from tokens.constants import Reason
from tokens.models import Provider, ProviderState, Token
from tokens.services import refresh

pytestmark = pytest.mark.django_db(transaction=True)


def refreshed(name: str = "api") -> Provider:
    provider = counted_provider(name)
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    return provider


def test_public_names() -> None:
    import tokens

    assert issubclass(UnknownProvider, TokenError) and issubclass(UnknownProvider, LookupError)
    assert issubclass(ProviderDisabled, TokenError) and issubclass(TokenUnavailable, TokenError)
    assert tokens.get_token is api.get_token


@pytest.mark.timeout(10)
def test_get_token__unknown_name_raises_at_once() -> None:
    with pytest.raises(UnknownProvider, match="no token provider named 'nope'"):
        get_token("nope", timeout=60)
    with pytest.raises(LookupError):
        get_token("nope", timeout=60)


@pytest.mark.timeout(10)
def test_get_token__disabled_provider_raises_at_once() -> None:
    counted_provider(enabled=False)
    with pytest.raises(ProviderDisabled, match="'api' is disabled"):
        get_token("api", timeout=60)


@pytest.mark.parametrize(
    ("name", "timeout", "error"),
    [
        ("", None, ValueError),
        (None, None, TypeError),
        (b"api", None, TypeError),
        (["api"], None, TypeError),
        ("api", -1, ValueError),
        ("api", float("nan"), ValueError),
        ("api", "5", TypeError),
    ],
)
def test_get_token__bad_arguments(name: object, timeout: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="get_token"):
        get_token(name, timeout=timeout)  # type: ignore[arg-type]


def test_get_token__reads_redis_then_keeps_it_in_memory(redis_client: redis.Redis) -> None:
    refreshed()
    # Listening first: a read that overlaps the listener's (re)connection is not kept, since
    # anything may have changed unheard (the generation moves on the subscription).
    memory.listener.ensure_running()
    assert memory.listener.connected.wait(5)
    assert get_token("api") == "api-token-1"
    assert memory.memory["api"][0] == "api-token-1"
    redis_client.delete("tokens:tok:api")  # behind its back: memory still answers
    assert get_token("api") == "api-token-1"


def test_get_token__falls_back_to_the_database_and_refills_redis(redis_client: redis.Redis) -> None:
    refreshed()
    redis_client.flushdb()
    assert get_token("api") == "api-token-1"
    assert cache.entry_get("api").value == "api-token-1"


def test_get_token__never_returns_an_expired_token(redis_client: redis.Redis) -> None:
    provider = refreshed()
    Token.objects.filter(provider=provider).update(expires_at=timezone.now() - timedelta(seconds=1))
    redis_client.flushdb()
    with pytest.raises(TokenUnavailable) as caught:
        get_token("api", timeout=0.3)
    assert "waited" in str(caught.value) and "api-token" not in str(caught.value)


def test_get_token__timeout_names_the_last_error() -> None:
    provider = make_provider("api", config={"client_id": "c"})  # invalid config
    refresh.token_refresh(provider_id=provider.pk)
    with pytest.raises(TokenUnavailable) as caught:
        get_token("api", timeout=0.2)
    assert "last refresh error: permanent: invalid provider config" in str(caught.value)


def test_get_token__waits_for_first_token_and_wakes_on_the_notification(settings) -> None:
    settings.TOKENS_WAIT_RECHECK = 60  # a wake-up can only come from the notification
    provider = counted_provider()

    def refresh_later() -> None:
        time.sleep(0.3)
        try:
            refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
        finally:
            connection.close()  # a thread's own connection

    thread = threading.Thread(target=refresh_later)
    thread.start()
    started = time.monotonic()
    assert get_token("api", timeout=30) == "api-token-1"
    thread.join()
    assert time.monotonic() - started < 30  # woken, not timed out


def test_get_token__asks_for_exactly_one_refresh(redis_client: redis.Redis) -> None:
    from django.conf import settings

    provider = counted_provider()
    purge_queues()
    for _ in range(3):
        with pytest.raises(TokenUnavailable):
            get_token("api", timeout=0.2)
    assert redis_client.exists(f"tokens:pending:{provider.pk}")
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    assert broker.llen("tokens.urgent") == 1  # three waiting callers, one refresh message


def test_get_token__token_stored_between_read_and_wait_is_not_missed(
    settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SUBSCRIBE, then GET, then wait: a store that lands right after the miss still wakes us."""
    settings.TOKENS_WAIT_RECHECK = 60
    counted_provider()
    memory.listener.ensure_running()
    memory.listener.connected.wait(5)
    original = selectors.provider_for_reading_with_state
    calls = []

    def read_then_store(*, name: str) -> Provider:
        provider = original(name=name)
        if not calls:
            calls.append(1)  # the miss is read; a refresh stores before the caller waits
            refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
        return provider

    monkeypatch.setattr(selectors, "provider_for_reading_with_state", read_then_store)
    assert get_token("api", timeout=20) == "api-token-1"


def test_get_token__near_expiry_serves_the_token_and_asks_for_a_new_one(
    redis_client: redis.Redis,
) -> None:
    provider = refreshed()
    Token.objects.filter(provider=provider).update(refresh_at=timezone.now() - timedelta(seconds=1))
    redis_client.flushdb()
    assert get_token("api") == "api-token-1"
    assert redis_client.exists(f"tokens:pending:{provider.pk}")


def test_get_token__memory_follows_a_new_token_from_elsewhere() -> None:
    provider = refreshed()
    assert get_token("api") == "api-token-1"
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    wait_for(lambda: get_token("api") == "api-token-2", 5, message="the new token")


def test_get_token__disabling_reaches_memory(settings) -> None:
    provider = refreshed()
    assert get_token("api") == "api-token-1"
    provider.enabled = False
    provider.save()

    def disabled() -> bool:
        try:
            get_token("api", timeout=0)
        except ProviderDisabled:
            return True
        return False

    wait_for(disabled, 5, message="ProviderDisabled")


def test_get_token__config_change_never_serves_the_old_token() -> None:
    provider = refreshed()
    assert get_token("api") == "api-token-1"
    provider.config = {"path": "tests.callables.mapping"}
    provider.save()
    wait_for(lambda: "api" not in memory.memory, 5, message="memory to drop the old token")
    with pytest.raises(TokenUnavailable):
        get_token("api", timeout=0.2)  # no worker here: no new token, and never the old one
    refresh.token_refresh(provider_id=provider.pk)
    assert get_token("api") == "mapped"
    assert ProviderState.objects.get(provider=provider).current_version > 1


def test_get_token__an_entry_copied_to_another_providers_key_is_not_served(
    redis_client: redis.Redis,
) -> None:
    """The cache entry is bound to its provider's name inside the ciphertext: a value copied
    from one key to another (by anyone with Redis access) is dropped, not served."""
    refreshed("alpha")
    other = refreshed("beta")
    alpha_entry = redis_client.get("tokens:tok:alpha")
    redis_client.set("tokens:tok:beta", alpha_entry)
    memory.memory.clear()
    assert cache.entry_get("beta") is None  # refused and dropped
    assert redis_client.get("tokens:tok:beta") is None
    assert get_token("beta") == Token.objects.get(provider=other).value  # from the database
    assert get_token("beta") != Token.objects.get(provider__name="alpha").value


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(-1, ValueError), (float("nan"), ValueError), ("5", TypeError), (True, TypeError)],
)
def test_get_token__arguments_are_checked_the_same_warm_or_cold(
    timeout: object, error: type[Exception]
) -> None:
    refreshed("api")
    memory.memory.clear()
    with pytest.raises(error):  # cold
        get_token("api", timeout=timeout)  # type: ignore[arg-type]
    assert get_token("api") and "api" in memory.memory
    with pytest.raises(error):  # warm: the same answer
        get_token("api", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(error):
        api.get_token_with_type("api", timeout=timeout)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_get_token__a_megabyte_name_is_unknown_at_once_and_not_repeated() -> None:
    name = "x" * 1024 * 1024
    with pytest.raises(UnknownProvider) as caught:
        get_token(name, timeout=60)
    assert len(str(caught.value)) < 150
    with pytest.raises(UnknownProvider) as caught:
        get_token("y" * 100, timeout=60)  # a name that could exist is looked up
    assert len(str(caught.value)) < 150


def test_get_token__a_renamed_providers_late_write_is_never_served_under_its_old_name() -> None:
    """A refresh (or reader) of a provider still in flight when it is renamed cannot cache its
    token under the old name: the rename voids its tokens (the store is fenced out), and the old
    name's Redis fence is raised out of reach for a lock TTL instead of being reset."""
    old = refreshed("payments")
    old_version = Token.objects.get(provider=old).version
    old.name = "payments-old"
    old.save()
    assert ProviderState.objects.get(provider=old).current_version > old_version
    late = CachedToken(
        provider_id=old.pk,
        version=old_version + 50,
        value="OLD-PROVIDER-LATE",
        token_type="Bearer",
        expires_at=time.time() + 3600,
        refresh_at=None,
    )
    assert cache.entries_put([("payments", late)], now=time.time(), publish=True) == [False]
    newcomer = make_provider("payments", kind="static", secret="NEW-PROVIDER-TOKEN")
    refresh.token_refresh(provider_id=newcomer.pk, reason=Reason.MANUAL)
    memory.memory.clear()
    assert get_token("payments") == "NEW-PROVIDER-TOKEN"
    refresh.token_refresh(provider_id=old.pk, reason=Reason.MANUAL)
    assert get_token("payments-old").startswith("payments-old-token-")


def test_get_token__stops_handing_a_token_out_a_skew_before_its_expiry(
    redis_client: redis.Redis,
) -> None:
    """A caller never receives a token that dies in its hands: a 3 s token is not handed out
    in its last 0.3 s (TOKENS_EXPIRY_SKEW's default: the smaller of 5 s and 10 %)."""
    provider = make_provider(
        "short", kind="callable", config={"path": "tests.callables.short_lived"}
    )
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    token = Token.objects.get(provider=provider)
    skew = token.expires_at - token.usable_until
    assert abs(skew.total_seconds() - 0.3) < 0.01
    assert token.refresh_at is not None and token.refresh_at < token.usable_until
    now = timezone.now()
    Token.objects.filter(provider=provider).update(
        issued_at=now - timedelta(seconds=2.8), expires_at=now + timedelta(seconds=0.2)
    )
    redis_client.flushdb()
    memory.memory.clear()
    with pytest.raises(TokenUnavailable):
        get_token("short", timeout=0.2)  # 0.2 s left of a 3 s life: within the skew


def test_get_token__a_permanent_error_fails_at_once() -> None:
    provider = make_provider("api", config={"client_id": "c"})  # invalid config: permanent
    refresh.token_refresh(provider_id=provider.pk)
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="last refresh error: permanent"):
        get_token("api", timeout=5)
    assert time.monotonic() - started < 0.5


def test_get_token__a_far_retry_fails_at_once_and_is_brought_closer(settings) -> None:
    """Transient failure, next attempt in five minutes: waiting cannot help, so the caller
    hears at once; readers wanting a token bring the retry within TOKENS_RETRY_MAX_WANTED."""
    provider = make_provider("api", config={"client_id": "c"})
    refresh.token_refresh(provider_id=provider.pk)
    far = timezone.now() + timedelta(minutes=5)
    ProviderState.objects.filter(provider=provider).update(
        permanent_error=False, next_attempt_at=far
    )
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="not retried yet"):
        get_token("api", timeout=5)
    assert time.monotonic() - started < 0.5
    soon = ProviderState.objects.get(provider=provider).next_attempt_at
    assert soon is not None and soon <= timezone.now() + timedelta(seconds=4.5)


def test_get_token__a_retry_due_in_a_moment_is_waited_for_briefly() -> None:
    provider = make_provider("api", config={"client_id": "c"})
    refresh.token_refresh(provider_id=provider.pk)
    ProviderState.objects.filter(provider=provider).update(
        permanent_error=False, next_attempt_at=timezone.now() + timedelta(seconds=0.2)
    )
    started = time.monotonic()
    with pytest.raises(TokenUnavailable, match="waited"):
        get_token("api", timeout=5)  # for the retry (none comes here) and half a second more
    assert 0.6 <= time.monotonic() - started < 1.2


def test_get_token__a_running_refresh_is_waited_for_as_long_as_asked() -> None:
    """The last refresh failed and its retry is due now, but a refresh holds the lock: the
    caller waits its whole timeout for it, not half a second past the retry's due time."""
    from tokens import locks

    provider = make_provider("api", config={"client_id": "c"})
    refresh.token_refresh(provider_id=provider.pk)
    ProviderState.objects.filter(provider=provider).update(
        permanent_error=False, next_attempt_at=timezone.now()
    )
    held = locks.locks_acquire([provider.pk])
    try:
        started = time.monotonic()
        with pytest.raises(TokenUnavailable, match="waited"):
            get_token("api", timeout=1.5)
        assert time.monotonic() - started >= 1.4
    finally:
        locks.locks_release(held)


def test_get_token__readers_never_bring_a_retry_before_the_issuers_retry_after(
    make_httpserver, settings
) -> None:
    settings.TOKENS_RETRY_MAX = 300  # the suite's is 4 s: Retry-After is honoured up to it
    server = make_httpserver
    server.expect_request("/ra", method="POST").respond_with_data(
        '{"error": "slow_down"}',
        status=429,
        headers={"Retry-After": "120"},
        content_type="application/json",
    )
    provider = make_provider("api", config={"token_url": server.url_for("/ra"), "client_id": "c"})
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    with pytest.raises(TokenUnavailable):
        get_token("api", timeout=5)
    retry = ProviderState.objects.get(provider=provider).next_attempt_at
    assert retry is not None and retry > timezone.now() + timedelta(seconds=100)
