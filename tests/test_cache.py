"""The cache entry in Redis: fenced by version, kept under the configured alias."""

from __future__ import annotations

import pytest
import redis

from tests.factories import counted_provider
from tokens import cache
from tokens.cache import CachedToken
from tokens.services import refresh

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def test_store__redis_refuses_an_older_version_even_without_the_db() -> None:
    now = 1e10
    newer = CachedToken(1, 5, "new", "Bearer", None, None)
    older = CachedToken(1, 4, "old", "Bearer", None, None)
    assert cache.entries_put([("x", newer)], now=0, publish=False) == [True]
    assert cache.entries_put([("x", older)], now=0, publish=False) == [False]
    assert cache.entry_get("x").value == "new"
    # the same version may be put back
    assert cache.entries_put([("x", newer)], now=0, publish=False) == [True]
    expired = CachedToken(1, 6, "late", "Bearer", now - 1, None)
    assert cache.entries_put([("x", expired)], now=now, publish=False) == [False]


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
        refresh.token_refresh(provider_id=provider.pk)
        assert other.exists("tokens:tok:api")
        assert not redis_client.exists("tokens:tok:api")
        assert cache.entry_get("api").value == "api-token-1"
    finally:
        other.flushdb()
