"""Redis side of tokens: the encrypted cache entry, version fencing, locks, notifications.

Keys (prefix TOKENS_REDIS_PREFIX, default "tokens"):
  <p>:tok:<name>      encrypted JSON of the current token (and its name), TTL until its expiry
  <p>:ver:<name>      highest version written for <name> (no TTL): fences late, older writers
  <p>:lock:<id>       refresh lock, TTL TOKENS_LOCK_TTL
  <p>:pending:<id>    a refresh was requested by a reader, TTL TOKENS_PENDING_TTL
  <p>:inval:<id>      the token was voided by invalidate_token(), TTL TOKENS_INVALIDATE_COOLDOWN
  <p>:manual:<id>     an operator asked for a refresh, TTL TOKENS_HTTP_TIMEOUT
  <p>:events          pub/sub channel: {"n": name, "v": version, "e": "stored"|"changed"}
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field

import redis
from django_redis import get_redis_connection
from redis.commands.core import Script
from redis.lock import Lock

from tokens import crypto
from tokens.conf import tokens_settings
from tokens.exceptions import DecryptionError

logger = logging.getLogger(__name__)

# Write an entry only if its version is not older than the newest one written; optionally publish.
_SET_IF_NEWER = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local version = tonumber(ARGV[1])
if version < current then return 0 end
if version > current then redis.call('SET', KEYS[2], ARGV[1]) end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
if ARGV[4] == '1' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
"""

# Delete a lock only if it still holds our token (redis-py's Lock does the same, one at a time).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

StoreError = redis.RedisError


@dataclass(frozen=True)
class CachedToken:
    provider_id: int
    version: int
    value: str = field(repr=False)
    token_type: str
    expires_at: float | None  # Unix time
    refresh_at: float | None  # Unix time


def client() -> redis.Redis:
    return get_redis_connection(tokens_settings.CACHE_ALIAS)


def _key(kind: str, ident: object) -> str:
    return f"{tokens_settings.REDIS_PREFIX}:{kind}:{ident}"


def channel() -> str:
    return f"{tokens_settings.REDIS_PREFIX}:events"


def get(name: str) -> CachedToken | None:
    """The cached token of ``name``, or None. Raises StoreError when Redis is unreachable."""
    raw: bytes | None = client().get(_key("tok", name))  # type: ignore[assignment]
    if raw is None:
        return None
    try:
        data = json.loads(crypto.decrypt(raw.decode(), what="a cached token"))
        if data["n"] != name:
            # Copied from another provider's key: the entry is bound to its name inside the
            # ciphertext, so it is never served as this provider's token.
            raise ValueError("cache entry of another provider")
        return CachedToken(
            provider_id=int(data["i"]),
            version=int(data["v"]),
            value=data["t"],
            token_type=data["y"],
            expires_at=data["e"],
            refresh_at=data["r"],
        )
    except (DecryptionError, ValueError, KeyError, TypeError):
        logger.warning("tokens: dropping an unreadable cache entry for provider %r", name)
        client().delete(_key("tok", name))
        return None


def put(name: str, token: CachedToken, *, now: float, publish: bool) -> bool:
    """Store ``token`` unless a newer version was written; publish "stored" when asked.

    Returns whether it was written. Raises StoreError when Redis is unreachable.
    """
    return put_many([(name, token)], now=now, publish=publish)[0]


def put_many(entries: list[tuple[str, CachedToken]], *, now: float, publish: bool) -> list[bool]:
    """``put`` for several providers in one round trip; whether each was written."""
    script = client().register_script(_SET_IF_NEWER)
    calls = [
        ([_key("tok", name), _key("ver", name)], _put_args(name, token, now=now, publish=publish))
        for name, token in entries
    ]
    return [bool(result) for result in _run_script(script, calls)]


def _run_script(
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


def _put_args(
    name: str, token: CachedToken, *, now: float, publish: bool
) -> list[str | int | float] | None:
    ttl_ms = 0
    if token.expires_at is not None:
        ttl_ms = int((token.expires_at - now) * 1000)
        if ttl_ms <= 0:
            return None
    payload = crypto.encrypt(
        json.dumps(
            {
                "n": name,
                "i": token.provider_id,
                "v": token.version,
                "t": token.value,
                "y": token.token_type,
                "e": token.expires_at,
                "r": token.refresh_at,
            }
        )
    )
    message = json.dumps({"n": name, "v": token.version, "e": "stored"})
    return [token.version, payload, ttl_ms, "1" if publish else "0", channel(), message]


def invalidate(name: str, version: int) -> bool:
    """Drop the cached token of ``name`` and fence out writers older than ``version``; publish."""
    message = json.dumps({"n": name, "v": version, "e": "changed"})
    script = client().register_script(_SET_IF_NEWER)
    args: list[str | int | float] = [version, "", 0, "1", channel(), message]
    return bool(_run_script(script, [([_key("tok", name), _key("ver", name)], args)])[0])


# Versions are per provider: a name's fence cannot simply be reset when its provider goes (a
# refresh or reader of the old provider still in flight could then cache its token under the
# name). It is raised out of reach for as long as such a write can be in flight (the lock TTL),
# then vanishes, and the name's next provider starts from its own versions.
TOMBSTONE = 2**62


def forget(name: str) -> None:
    """Drop the cached token of a provider that no longer has ``name`` (deleted or renamed),
    fence out late writes under the name for a lock TTL, and tell the other processes."""
    ttl_ms = max(1000, int(tokens_settings.seconds("LOCK_TTL") * 1000))
    pipe = client().pipeline(transaction=True)
    pipe.delete(_key("tok", name))
    pipe.set(_key("ver", name), TOMBSTONE, px=ttl_ms)
    pipe.publish(channel(), json.dumps({"n": name, "v": 0, "e": "changed"}))
    pipe.execute()


def refresh_lock(provider_id: int) -> Lock:
    """The fleet-wide lock of one provider's refresh; it expires by its TTL if its holder dies."""
    return client().lock(
        _key("lock", provider_id),
        timeout=tokens_settings.seconds("LOCK_TTL"),
        blocking=False,
    )


def acquire_locks(provider_ids: list[int]) -> dict[int, str]:
    """Take each provider's refresh lock that is free, in one round trip: {id: lock token}.

    The same keys and values as ``refresh_lock`` (redis-py's Lock), so either sees the other.
    """
    ttl_ms = int(tokens_settings.seconds("LOCK_TTL") * 1000)
    wanted = {pid: uuid.uuid4().hex for pid in provider_ids}
    pipe = client().pipeline(transaction=False)
    for pid, token in wanted.items():
        pipe.set(_key("lock", pid), token, nx=True, px=ttl_ms)
    taken = pipe.execute()
    return {pid: token for (pid, token), ok in zip(wanted.items(), taken, strict=True) if ok}


def release_locks(held: dict[int, str]) -> list[int]:
    """Release locks taken by ``acquire_locks``; returns the ids whose lock had expired."""
    if not held:
        return []
    script = client().register_script(_RELEASE)
    released = _run_script(script, [([_key("lock", pid)], [token]) for pid, token in held.items()])
    return [pid for pid, ok in zip(held, released, strict=True) if not ok]


def settle_pending(*, clear: list[int], hold: dict[int, float]) -> None:
    """Let readers ask for a refresh of ``clear`` again at once, and of ``hold`` (id: seconds)
    only after that long; one round trip."""
    pipe = client().pipeline(transaction=False)
    if clear:
        pipe.delete(*[_key("pending", pid) for pid in clear])
    for pid, seconds in hold.items():
        pipe.set(_key("pending", pid), "1", px=max(1, int(seconds * 1000)))
    if clear or hold:
        pipe.execute()


def hold_pending_for_locks(provider_ids: list[int]) -> None:
    """Keep readers from asking again while each refresh lock lives (at least briefly)."""
    pipe = client().pipeline(transaction=False)
    for pid in provider_ids:
        pipe.pttl(_key("lock", pid))
    remaining = pipe.execute()
    settle_pending(
        clear=[],
        hold={
            pid: max(int(ms), 50) / 1000 for pid, ms in zip(provider_ids, remaining, strict=True)
        },
    )


def locks_held(provider_ids: list[int]) -> list[bool]:
    """Whether each provider's refresh lock is held (one round trip)."""
    values = client().mget([_key("lock", pid) for pid in provider_ids])
    return [value is not None for value in values]  # type: ignore[union-attr]


def held_lock_ids() -> set[int]:
    """Ids of the providers whose refresh lock is held now."""
    prefix = _key("lock", "")
    ids = set()
    for key in client().scan_iter(match=f"{prefix}*", count=1000):
        suffix = key.decode().removeprefix(prefix)
        if suffix.isdigit():
            ids.add(int(suffix))
    return ids


def mark_pending(provider_id: int) -> bool:
    """Claim the right to enqueue a refresh for readers; False if one was asked for already."""
    ttl_ms = int(tokens_settings.seconds("PENDING_TTL") * 1000)
    return bool(client().set(_key("pending", provider_id), "1", nx=True, px=ttl_ms))


def clear_pending(provider_id: int) -> None:
    client().delete(_key("pending", provider_id))


def claim(kind: str, provider_id: int, seconds: float) -> bool:
    """Claim ``kind`` ("inval", "manual") for ``provider_id`` for ``seconds``; False if taken."""
    ttl_ms = max(1, int(seconds * 1000))
    return bool(client().set(_key(kind, provider_id), "1", nx=True, px=ttl_ms))
