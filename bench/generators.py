"""Generators for the benchmarks (imported by path in the worker)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

_client: redis.Redis | None = None


def instant(provider: Any) -> dict[str, Any]:
    """Returns at once; counts its calls in Redis so a benchmark can check single-flight."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    number = _client.incr(f"bench:calls:{provider.name}")
    return {"access_token": f"{provider.name}-{number}", "expires_in": 3600}


def scheduled(provider: Any) -> dict[str, Any]:
    """Returns at once; logs the time of each call, for the schedule's lateness (figure 5)."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    _client.rpush("bench:sched", f"{provider.pk}:{time.time()}")
    return {"access_token": f"{provider.name}-{time.time()}", "expires_in": 3600}
