"""Refresh locks in Redis: a holder releases only the locks that are still its own, and settles
the readers' claims of its providers in the same call, before the locks go (never the claim of
a refresh that holds the lock now)."""

from __future__ import annotations

import logging
import socket

import pytest
import redis

from tokens import locks
from tokens.redis_client import key


def test_locks_release__frees_its_own_locks_only_and_settles_readers_claims(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    held = locks.locks_acquire([1, 2, 3, 4, 5, 6])
    assert sorted(held) == [1, 2, 3, 4, 5, 6]
    redis_client.set(key("lock", 4), "another holder's")  # 4's lock expired and was taken again
    redis_client.set(key("lock", 5), "another holder's")
    redis_client.delete(key("lock", 6))  # 6's lock expired, nobody took it
    for pid in (1, 2, 3, 4, 5, 6):
        assert locks.pending_claim(pid)
        redis_client.pexpire(key("pending", pid), 600_000)

    with caplog.at_level(logging.WARNING, logger="tokens"):
        assert locks.locks_release(held, clear=[1, 4], hold={2: 30.0, 5: 30.0, 6: 30.0})

    assert locks.locks_held([1, 2, 3, 4, 5, 6]) == [False, False, False, True, True, False]
    assert locks.locks_held_ids() == {4, 5}  # still indexed: their holder releases them
    assert redis_client.get(key("lock", 4)) == b"another holder's"
    assert not redis_client.exists(key("pending", 1))  # readers may ask again at once
    assert 25_000 < redis_client.pttl(key("pending", 2)) <= 30_000  # after the hold
    assert redis_client.pttl(key("pending", 3)) > 30_000  # not named: left as it was
    # Another refresh holds 4's and 5's locks: their readers' claims are that refresh's.
    assert redis_client.pttl(key("pending", 4)) > 30_000
    assert redis_client.pttl(key("pending", 5)) > 30_000
    assert 25_000 < redis_client.pttl(key("pending", 6)) <= 30_000  # nobody else's: settled
    for pid in (4, 5, 6):
        assert f"refresh lock of provider {pid} expired before release" in caplog.text
    assert "provider 1 " not in caplog.text and "provider 2 " not in caplog.text


def test_locks_release__with_redis_unreachable_says_so(
    settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller must know its locks are still held (it keeps them to release again later)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    settings.CACHES = {
        **settings.CACHES,
        "gone": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{port}/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        },
    }
    settings.TOKENS_CACHE_ALIAS = "gone"
    with caplog.at_level(logging.WARNING, logger="tokens"):
        assert locks.locks_release({1: "token"}, clear=[1]) is False
    assert "could not release refresh locks" in caplog.text
