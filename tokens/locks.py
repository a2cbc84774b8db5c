"""Refresh locks and readers' claims in Redis: at most one refresh per provider at a time
fleet-wide, and one request for a refresh per provider while one is pending.

Locks take redis-py's ``Lock`` keys and values (``lock()``), so either sees the other; they expire
by TOKENS_LOCK_TTL if their holder dies. Claims (``pending``, ``inval``, ``manual``) are
``SET NX`` keys with a TTL.
"""

from __future__ import annotations

import logging
import time
import uuid

from redis.lock import Lock

from tokens.conf import tokens_settings
from tokens.exceptions import CacheUnavailable
from tokens.redis_client import best_effort, client, key, translated

logger = logging.getLogger("tokens")

# Release locks and settle readers' claims, in one call: KEYS are the index of held locks, then
# each provider's lock and "pending" claim; ARGV per provider its lock token, its id and the
# claim's new lifetime in ms (-1: leave it, 0: delete it). A lock is deleted only if it still
# holds our token (redis-py's Lock does the same, one at a time), and leaves the index; a claim
# is settled only if no other refresh holds the lock now (its readers are that refresh's).
_RELEASE = """
local released = {}
for i = 0, (#KEYS - 1) / 2 - 1 do
  local lock, pending = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local token, pid, ms = ARGV[1 + 3 * i], ARGV[2 + 3 * i], tonumber(ARGV[3 + 3 * i])
  local holder = redis.call('GET', lock)
  if holder == token or not holder then
    if ms == 0 then
      redis.call('DEL', pending)
    elseif ms > 0 then
      redis.call('SET', pending, '1', 'PX', ms)
    end
  end
  if holder == token then
    redis.call('ZREM', KEYS[1], pid)
    released[#released + 1] = redis.call('DEL', lock)
  else
    released[#released + 1] = 0
  end
end
return released
"""


def _held_index() -> str:
    """A sorted set of the providers whose lock ``locks_acquire`` took, scored by when the lock
    expires (Unix ms): who is refreshing, found without scanning every key. Its size is the
    number of refreshes in flight (an entry outlives its lock only if its holder died, until
    its score passes)."""
    return key("locks", "held")


def lock(provider_id: int) -> Lock:
    """The fleet-wide lock of one provider's refresh (redis-py's Lock, non-blocking)."""
    return client().lock(
        key("lock", provider_id),
        timeout=tokens_settings.seconds("LOCK_TTL"),
        blocking=False,
    )


def locks_acquire(provider_ids: list[int]) -> dict[int, str]:
    """Take each provider's refresh lock that is free, in one round trip: {id: lock token}.
    CacheUnavailable when Redis is unreachable."""
    ttl_ms = int(tokens_settings.seconds("LOCK_TTL") * 1000)
    wanted = {pid: uuid.uuid4().hex for pid in provider_ids}
    if not wanted:
        return {}
    with translated():
        pipe = client().pipeline(transaction=False)
        for pid, token in wanted.items():
            pipe.set(key("lock", pid), token, nx=True, px=ttl_ms)
        # Indexed in the same round trip; a lock held by somebody else is indexed already,
        # and readers check each entry's lock (locks_held_ids).
        expires_ms = int(time.time() * 1000) + ttl_ms
        pipe.zadd(_held_index(), {str(pid): expires_ms for pid in wanted})
        *taken, _ = pipe.execute()
    return {pid: token for (pid, token), ok in zip(wanted.items(), taken, strict=True) if ok}


def locks_release(
    held: dict[int, str], *, clear: list[int] | None = None, hold: dict[int, float] | None = None
) -> bool:
    """Release locks taken by ``locks_acquire`` (one round trip); one that had expired (its
    holder outlived its TTL) is logged. ``clear`` and ``hold``, of the providers in ``held``:
    as ``pending_settle``, in the same call, before each lock goes (not for a lock another
    refresh holds now). False if Redis was unreachable (logged)."""
    if not held:
        return True
    clear_ids, hold = set(clear or ()), hold or {}
    keys: list[str] = [_held_index()]
    args: list[str | int] = []
    for pid, token in held.items():
        keys += [key("lock", pid), key("pending", pid)]
        ms = 0 if pid in clear_ids else max(1, int(hold[pid] * 1000)) if pid in hold else -1
        args += [token, pid, ms]
    with best_effort("release refresh locks"):
        released = client().register_script(_RELEASE)(keys=keys, args=args)
        for pid, ok in zip(held, released, strict=True):
            if not ok:
                logger.warning("tokens: refresh lock of provider %s expired before release", pid)
        return True
    return False


def locks_held(provider_ids: list[int]) -> list[bool]:
    """Whether each provider's refresh lock is held (one round trip); all False when Redis is
    unreachable (for display: nothing is known to be refreshing)."""
    if not provider_ids:
        return []
    with best_effort("read refresh locks"):
        values = client().mget([key("lock", pid) for pid in provider_ids])
        return [value is not None for value in values]  # type: ignore[union-attr]
    return [False] * len(provider_ids)


def locks_held_ids() -> set[int]:
    """Ids of the providers whose refresh lock ``locks_acquire`` took is held now (empty when
    Redis is unreachable): two round trips, however many keys Redis holds."""
    with best_effort("read refresh locks"):
        pipe = client().pipeline(transaction=False)
        pipe.zremrangebyscore(_held_index(), "-inf", int(time.time() * 1000))
        pipe.zrange(_held_index(), 0, -1)
        _, members = pipe.execute()
        candidates = [int(member) for member in members]
        return {pid for pid, held in zip(candidates, locks_held(candidates), strict=True) if held}
    return set()


def pending_claim(provider_id: int) -> bool:
    """Claim the right to ask for a refresh for readers; False if one was asked for already.
    CacheUnavailable when Redis is unreachable."""
    ttl_ms = int(tokens_settings.seconds("PENDING_TTL") * 1000)
    with translated():
        return bool(client().set(key("pending", provider_id), "1", nx=True, px=ttl_ms))


def pending_clear(provider_id: int) -> None:
    """Let readers ask for a refresh of ``provider_id`` again at once."""
    with best_effort("clear a pending refresh"):
        client().delete(key("pending", provider_id))


def pending_settle(*, clear: list[int], hold: dict[int, float]) -> None:
    """Let readers ask for a refresh of ``clear`` again at once, and of ``hold`` (id: seconds)
    only after that long; one round trip."""
    if not clear and not hold:
        return
    with best_effort("settle pending refreshes"):
        pipe = client().pipeline(transaction=False)
        if clear:
            pipe.delete(*[key("pending", pid) for pid in clear])
        for pid, seconds in hold.items():
            pipe.set(key("pending", pid), "1", px=max(1, int(seconds * 1000)))
        pipe.execute()


def pending_hold_for_locks(provider_ids: list[int]) -> None:
    """Keep readers from asking again while each refresh lock lives (at least briefly)."""
    with best_effort("hold pending refreshes"):
        pipe = client().pipeline(transaction=False)
        for pid in provider_ids:
            pipe.pttl(key("lock", pid))
        remaining = pipe.execute()
        pending_settle(
            clear=[],
            hold={
                pid: max(int(ms), 50) / 1000
                for pid, ms in zip(provider_ids, remaining, strict=True)
            },
        )


def refresh_expected(provider_id: int) -> bool:
    """Whether a refresh of ``provider_id`` runs now (its lock) or an operator just asked for
    one ("Refresh now"): readers then wait for it rather than fail at once."""
    with translated():
        return bool(client().exists(key("lock", provider_id), key("manual", provider_id)))


def claim(kind: str, provider_id: int, seconds: float) -> bool:
    """Claim ``kind`` ("inval", "manual") for ``provider_id`` for ``seconds``; False if taken.
    CacheUnavailable when Redis is unreachable."""
    ttl_ms = max(1, int(seconds * 1000))
    with translated():
        return bool(client().set(key(kind, provider_id), "1", nx=True, px=ttl_ms))


def schedule_taken_mark(seconds: float, *, keeping_up: bool) -> None:
    """A batch takes due providers as they fall due, for ``seconds`` at least: keeping up with
    them (it took every one, none late), or in need of help (it had no room for them all, or
    they had waited)."""
    with best_effort("mark the schedule taken"):
        value = "up" if keeping_up else "help"
        client().set(key("schedule", "taken"), value, px=max(1, int(seconds * 1000)))


# Withdraw "up" only: a batch asking for help still wants the dispatcher's empty batch.
_UP_END = """
if redis.call('GET', KEYS[1]) == 'up' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def schedule_taken_end() -> None:
    """A batch that took due providers stops taking: a mark saying the batches keep up goes
    (the dispatcher claims due providers again at its next tick, not a mark's life later; a
    batch still taking marks again at its next take)."""
    with best_effort("end the schedule's taken mark"):
        client().register_script(_UP_END)(keys=[key("schedule", "taken")])


def schedule_taken() -> str | None:
    """How the schedule is taken (see ``schedule_taken_mark``): "up", "help", or None when no
    batch takes it (or Redis is unreachable: the dispatcher then claims due providers itself)."""
    try:
        with translated():
            value = client().get(key("schedule", "taken"))
    except CacheUnavailable:
        return None
    return value.decode() if isinstance(value, bytes) else None
