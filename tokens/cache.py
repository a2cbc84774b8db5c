"""The cache entry of each provider's current token in Redis, fenced by version, and the
notifications that tell every process about it.

The entry is encrypted and bound to its provider's name inside the ciphertext; a writer older
than the newest version written for the name is refused (a Lua "set if newer"), so a late
refresh can never replace a newer token.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokens import crypto
from tokens.conf import tokens_settings
from tokens.exceptions import DecryptionError
from tokens.redis_client import best_effort, channel, client, key, run_script, translated

if TYPE_CHECKING:
    from tokens.models import Token

logger = logging.getLogger("tokens")

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

# Versions are per provider: a name's fence cannot simply be reset when its provider goes (a
# refresh or reader of the old provider still in flight could then cache its token under the
# name). It is raised out of reach for as long as such a write can be in flight (the lock TTL),
# then vanishes, and the name's next provider starts from its own versions.
TOMBSTONE = 2**62


@dataclass(frozen=True)
class CachedToken:
    """A token as the cache holds it (times as Unix time)."""

    provider_id: int
    version: int
    value: str = field(repr=False)
    token_type: str
    expires_at: float | None
    refresh_at: float | None

    @classmethod
    def from_row(cls, token: Token) -> CachedToken:
        """The one conversion from a stored token row to a cache entry."""
        return cls(
            provider_id=token.provider_id,
            version=token.version,
            value=token.value,
            token_type=token.token_type,
            # Handed out until a skew before its expiry, so it never dies in a caller's hands.
            expires_at=token.usable_until.timestamp() if token.usable_until else None,
            refresh_at=token.refresh_at.timestamp() if token.refresh_at else None,
        )


def entry_get(name: str) -> CachedToken | None:
    """The cached token of ``name``, or None. CacheUnavailable when Redis is unreachable."""
    with translated():
        raw: bytes | None = client().get(key("tok", name))  # type: ignore[assignment]
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
        with best_effort("drop an unreadable cache entry"):
            client().delete(key("tok", name))
        return None


def entries_put(entries: list[tuple[str, CachedToken]], *, now: float, publish: bool) -> list[bool]:
    """Store each (name, token) unless a newer version was written for the name, in one round
    trip; publish "stored" when asked. Whether each was written; CacheUnavailable when Redis is
    unreachable."""
    if not entries:
        return []
    with translated():
        script = client().register_script(_SET_IF_NEWER)
        calls = [
            (
                [key("tok", name), key("ver", name)],
                _put_args(name, token, now=now, publish=publish),
            )
            for name, token in entries
        ]
        return [bool(result) for result in run_script(script, calls)]


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


def entry_void(name: str, version: int) -> bool:
    """Drop the cached token of ``name`` and fence out writers older than ``version``; tell
    every process. False when Redis refused it (a newer version) or is unreachable (logged)."""
    message = json.dumps({"n": name, "v": version, "e": "changed"})
    args: list[str | int | float] = [version, "", 0, "1", channel(), message]
    with best_effort(f"drop the cached token of {name}"):
        script = client().register_script(_SET_IF_NEWER)
        return bool(run_script(script, [([key("tok", name), key("ver", name)], args)])[0])
    return False


def failure_notify(name: str) -> None:
    """Tell the readers of ``name`` waiting for a refresh that it failed (they decide at once
    whether to keep waiting); nothing is dropped from anybody's memory."""
    with best_effort(f"announce the failed refresh of {name}"):
        client().publish(channel(), json.dumps({"n": name, "v": 0, "e": "failed"}))


def name_forget(name: str) -> None:
    """Drop the cached token of a provider that no longer has ``name`` (deleted or renamed),
    fence out late writes under the name for a lock TTL, and tell the other processes."""
    ttl_ms = max(1000, int(tokens_settings.seconds("LOCK_TTL") * 1000))
    with best_effort(f"drop the cached token of {name}"):
        pipe = client().pipeline(transaction=True)
        pipe.delete(key("tok", name))
        pipe.set(key("ver", name), TOMBSTONE, px=ttl_ms)
        pipe.publish(channel(), json.dumps({"n": name, "v": 0, "e": "changed"}))
        pipe.execute()
