"""Refresh locks in Redis: a holder releases only the locks that are still its own, and settles
the readers' claims of its providers in the same call, before the locks go."""

from __future__ import annotations

import logging

import pytest
import redis

from tokens import locks
from tokens.redis_client import key


def test_locks_release__frees_its_own_locks_only_and_settles_readers_claims(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    held = locks.locks_acquire([1, 2, 3, 4])
    assert sorted(held) == [1, 2, 3, 4]
    redis_client.set(key("lock", 4), "another holder's")  # 4's lock expired and was taken again
    for pid in (1, 2, 3):
        assert locks.pending_claim(pid)
    redis_client.pexpire(key("pending", 3), 600_000)

    with caplog.at_level(logging.WARNING, logger="tokens"):
        locks.locks_release(held, clear=[1], hold={2: 30.0})

    assert locks.locks_held([1, 2, 3, 4]) == [False, False, False, True]
    assert locks.locks_held_ids() == {4}  # still indexed: its holder releases it
    assert redis_client.get(key("lock", 4)) == b"another holder's"
    assert not redis_client.exists(key("pending", 1))  # readers may ask again at once
    assert 25_000 < redis_client.pttl(key("pending", 2)) <= 30_000  # after the hold
    assert redis_client.pttl(key("pending", 3)) > 30_000  # not named: left as it was
    assert "refresh lock of provider 4 expired before release" in caplog.text
    assert "provider 1 " not in caplog.text and "provider 2 " not in caplog.text
