"""The Redis connection the adapters share: the client, key names, the channel, scripts, and
the one place redis-py's errors become tokens' ``CacheUnavailable``.

Keys (prefix TOKENS_REDIS_PREFIX, default "tokens"):
  <p>:tok:<name>      encrypted JSON of the current token (and its name), TTL until its expiry
  <p>:ver:<name>      highest version written for <name> (no TTL): fences late, older writers
  <p>:lock:<id>       refresh lock, TTL TOKENS_LOCK_TTL
  <p>:locks:held      the held refresh locks' provider ids, scored by expiry (Unix ms)
  <p>:pending:<id>    a refresh was requested by a reader, TTL TOKENS_PENDING_TTL
  <p>:inval:<id>      the token was voided by invalidate_token(), TTL TOKENS_INVALIDATE_COOLDOWN
  <p>:manual:<id>     an operator asked for a refresh, TTL TOKENS_HTTP_TIMEOUT
  <p>:events          pub/sub channel: {"n": name, "v": version, "e": "stored"|"changed"}
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis
from django_redis import get_redis_connection
from redis.commands.core import Script

from tokens.conf import tokens_settings
from tokens.exceptions import CacheUnavailable

logger = logging.getLogger("tokens")


def client() -> redis.Redis:
    return get_redis_connection(tokens_settings.CACHE_ALIAS)


def key(kind: str, ident: object) -> str:
    return f"{tokens_settings.REDIS_PREFIX}:{kind}:{ident}"


def channel() -> str:
    return f"{tokens_settings.REDIS_PREFIX}:events"


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Around a Redis call whose answer matters: redis-py's errors become CacheUnavailable."""
    try:
        yield
    except redis.RedisError as error:
        raise CacheUnavailable(f"Redis unavailable ({type(error).__name__})") from error


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Around a Redis write nobody waits on: a failure is logged, not raised."""
    try:
        yield
    except redis.RedisError as error:
        logger.warning("tokens: Redis unavailable, could not %s (%s)", what, type(error).__name__)


def run_script(
    script: Script, calls: list[tuple[list[str], list[str | int | float] | None]]
) -> list[object]:
    """Run ``script`` once per (keys, args); None args are skipped (result None). One call goes
    straight (EVALSHA); several share a pipeline (which checks the script is loaded first)."""
    wanted = [(keys, args) for keys, args in calls if args is not None]
    if len(wanted) == 1:
        results = iter([script(keys=wanted[0][0], args=wanted[0][1])])
    elif wanted:
        pipe = client().pipeline(transaction=False)
        for keys, args in wanted:
            script(keys=keys, args=args, client=pipe)
        results = iter(pipe.execute())
    else:
        results = iter([])
    return [next(results) if args is not None else None for _, args in calls]
