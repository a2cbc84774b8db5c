"""Functions used as `callable` generators in tests (imported by path, also in worker processes)."""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from tokens.generators.base import GeneratedToken

NOT_CALLABLE = 42


def plain_string(provider: Any) -> str:
    return f"plain-{provider.name}"


def mapping(provider: Any) -> dict[str, Any]:
    return {"access_token": "mapped", "expires_in": "90", "token_type": "MAC"}


def generated(provider: Any) -> GeneratedToken:
    return GeneratedToken(access_token="gen", expires_at=datetime.now(UTC) + timedelta(seconds=30))


def generated_forever(provider: Any) -> GeneratedToken:
    return GeneratedToken(access_token="forever")


def explodes(provider: Any) -> str:
    raise RuntimeError(f"secret leaked: {provider.secret}")


def returns_number(provider: Any) -> int:
    return 7


def counted(provider: Any) -> dict[str, Any]:
    """A token numbered by a Redis counter, so tests count calls across processes."""
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    number = client.incr(f"test:calls:{provider.name}")
    delay = float(client.get(f"test:delay:{provider.name}") or 0)
    if delay:
        time.sleep(delay)
    return {"access_token": f"{provider.name}-token-{number}", "expires_in": 300}


def short_lived(provider: Any) -> dict[str, Any]:
    """A token that lives three seconds."""
    return {"access_token": f"{provider.name}-short", "expires_in": 3}


def exits(provider: Any) -> str:
    """A generator that ends the process it runs in, if it is let."""
    sys.exit(3)


def sleeps(provider: Any) -> str:
    """Sleeps for test:sleep:<name> seconds (default 60), counting its calls in Redis, and
    marks test:done:<name> when it returns."""
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    client.incr(f"test:calls:{provider.name}")
    time.sleep(float(client.get(f"test:sleep:{provider.name}") or 60))
    client.set(f"test:done:{provider.name}", "1")
    return f"{provider.name}-slept"
