"""get_token(): the read path, memory first.

1. This process's memory (a dict lookup and a clock read).
2. Redis (the encrypted cache entry), then the database (the source of truth, put back in Redis).
3. Nothing valid: ask for one refresh (deduplicated fleet-wide) and wait for the notification
   that a token was stored, re-reading now and then in case a notification was lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connection, connections
from django.utils import timezone

from tokens import cache, locks, memory, metrics, queue, selectors
from tokens.cache import CachedToken
from tokens.conf import tokens_settings
from tokens.constants import Reason
from tokens.exceptions import CacheUnavailable, ProviderDisabled, TokenUnavailable, UnknownProvider
from tokens.services import invalidation, refresh
from tokens.status import fails_fast

if TYPE_CHECKING:
    from tokens.models import ProviderState

logger = logging.getLogger(__name__)

# How long past a retry's due time a reader waits for it (a countdown's start can be late).
RETRY_GRACE = 0.5
# First re-check of a reader waiting on a failing provider's running refresh (then doubling).
RUNNING_RECHECK = 0.05
# Provider.name's max_length: a longer name names no provider.
MAX_NAME_LENGTH = 100

_memory = memory.memory
_listener = memory.listener
_time = time.time


def get_token(name: str, *, timeout: float | None = None) -> str:
    """Return a current, unexpired access token of the provider called ``name``.

    Waits up to ``timeout`` seconds (default TOKENS_WAIT_TIMEOUT) for a first token. Raises
    UnknownProvider, ProviderDisabled, or TokenUnavailable (with the provider's last error).
    """
    # The warm path, inlined (a function call would cost as much as the lookup itself). Only
    # str names are ever remembered, so a hit has a valid name; a timeout is checked as cold.
    try:
        entry = _memory.get(name)
    except TypeError:  # unhashable: reported properly below
        entry = None
    if entry is not None and entry[1] > _time():
        if timeout is not None:
            _check_arguments(name, timeout)
        return entry[0]
    return _get_token_slow(name, timeout)[0]


def _remembered(name: object) -> memory.Entry | None:
    """This process's entry for ``name`` while it may be trusted (get_token() inlines this)."""
    try:
        entry = _memory.get(name)  # type: ignore[call-overload]
    except TypeError:
        return None
    return entry if entry is not None and entry[1] > _time() else None


def get_token_with_type(name: str, *, timeout: float | None = None) -> tuple[str, str]:
    """get_token(), with the token's type ("Bearer", ...) for an Authorization header."""
    entry = _remembered(name)
    if entry is not None:
        if timeout is not None:
            _check_arguments(name, timeout)
        return entry[0], entry[3]
    return _get_token_slow(name, timeout)


async def aget_token(name: str, *, timeout: float | None = None) -> str:
    """get_token() for async code: waits in a worker thread, never blocking the event loop."""
    return (await aget_token_with_type(name, timeout=timeout))[0]


async def aget_token_with_type(name: str, *, timeout: float | None = None) -> tuple[str, str]:
    """aget_token(), with the token's type."""
    entry = _remembered(name)
    if entry is not None:
        if timeout is not None:
            _check_arguments(name, timeout)
        return entry[0], entry[3]
    return await sync_to_async(_in_worker_thread, thread_sensitive=False)(
        _get_token_slow, name, timeout
    )


def _in_worker_thread(function: Any, *args: Any) -> Any:
    """Run ``function`` in an executor thread, closing the database connection it opened."""
    try:
        return function(*args)
    finally:
        connections.close_all()


def invalidate_token(name: str, token: str) -> bool:
    """Report that an API rejected ``token`` (say, with a 401).

    If it is still the provider's current token it is dropped everywhere (every process's
    memory, Redis, the database's notion of current), a refresh is queued, and the next
    get_token() waits for the new token; returns True. A token that is no longer current (a
    stale rejection) changes nothing; returns False. At most one invalidation per provider per
    TOKENS_INVALIDATE_COOLDOWN voids anything.
    """
    _check_arguments(name, None)
    if not isinstance(token, str) or not token:
        raise TypeError("invalidate_token() token must be a non-empty str")
    return invalidation.token_reject(name=name, token=token)


async def ainvalidate_token(name: str, token: str) -> bool:
    """invalidate_token() for async code."""
    return bool(
        await sync_to_async(_in_worker_thread, thread_sensitive=False)(
            invalidate_token, name, token
        )
    )


def _check_arguments(name: object, timeout: object) -> float:
    if not isinstance(name, str):
        raise TypeError(f"get_token() name must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError("get_token() name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise UnknownProvider(name)  # no provider can have it: no query
    if timeout is None:
        return tokens_settings.seconds("WAIT_TIMEOUT")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"get_token() timeout must be a number, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout < 0:
        raise ValueError("get_token() timeout must be a finite number >= 0")
    return float(timeout)


class _Reader:
    """One get_token() call that missed memory."""

    def __init__(self, name: str, deadline: float = math.inf) -> None:
        self.name = name
        self.wanted_until = deadline  # time.monotonic(): the caller's own deadline
        self.deadline = deadline  # it, or sooner while only a retry due in a moment can help
        self.provider_id: int | None = None
        self.problems: list[str] = []
        # The provider's state, when the last read found it failing and waits only because a
        # refresh runs: re-checks decide again from it (Redis only) once that lock is gone.
        self.failing_state: ProviderState | None = None

    def read(self, *, database: bool = True) -> tuple[str, str] | None:
        """A valid token and its type from Redis or (with ``database``) the database, or None
        (after asking for a refresh)."""
        generation = _listener.generation(self.name)
        now = _time()
        try:
            cached = cache.entry_get(self.name)
        except CacheUnavailable:
            cached = None
            self._problem("Redis unavailable")
        if cached is not None and (cached.expires_at is None or cached.expires_at > now):
            self.provider_id = cached.provider_id
            self._remember(cached, now, generation)
            return cached.value, cached.token_type
        if not database and self.provider_id is not None:
            if self.failing_state is not None:
                self._fail_fast(self.provider_id, self.failing_state)
            self._request_refresh()
            return None
        try:
            provider = selectors.provider_for_reading_with_state(name=self.name)
            state = provider.state_or_none
            # Versions start at 1: while the current one is 0 no token was ever stored (a cold
            # start), and there is nothing to look up.
            token = (
                selectors.current_token(provider=provider)
                if state is not None and state.current_version
                else None
            )
        except (UnknownProvider, ProviderDisabled):
            raise
        except DatabaseError:
            self._problem("database unavailable")
            return None
        self.provider_id = provider.pk
        if token is None:
            self._fail_fast(provider.pk, state)
            self._request_refresh(failing=state is not None and state.consecutive_failures > 0)
            return None
        cached = CachedToken.from_row(token)
        with contextlib.suppress(CacheUnavailable):  # put back for the next reader
            cache.entries_put([(self.name, cached)], now=now, publish=False)
        self._remember(cached, now, generation)
        return cached.value, cached.token_type

    def _fail_fast(self, provider_id: int, state: ProviderState | None) -> None:
        """Raise TokenUnavailable now when waiting cannot help: the grant is gone (reconnect
        needed), or status.fails_fast, unless a refresh runs or an operator just asked for one
        (bring a far retry closer first). Decides from ``state`` as read with the provider."""
        self.failing_state = None
        if state is not None and state.reconnect_needed:
            # Nothing will come until a person connects the account again: say so now.
            metrics.UNAVAILABLE.labels(self.name, "reconnect").inc()
            raise TokenUnavailable(
                self.name, f"reconnect needed: {state.last_error or 'reconnect needed'}"
            )
        now = timezone.now()
        self.deadline = self.wanted_until
        deadline = now + timedelta(seconds=max(0.0, self.wanted_until - time.monotonic()))
        if state is None or not state.consecutive_failures:
            return
        try:
            if locks.refresh_expected(provider_id):
                # A refresh runs (or was just asked for): wait for it, as long as asked. A
                # failed refresh announces it moments before its lock goes: look again soon.
                self.failing_state = state
                return
        except CacheUnavailable:
            pass
        if not fails_fast(state, now=now, deadline=deadline):
            if state.next_attempt_at is not None:
                # Waiting for a retry due in a moment: for it, and half a second more (a retry
                # sent with a countdown can start late), not for the whole timeout.
                wait = (state.next_attempt_at - now).total_seconds() + RETRY_GRACE
                self.deadline = min(self.wanted_until, time.monotonic() + max(wait, RETRY_GRACE))
            return
        if not state.permanent_error:
            with contextlib.suppress(Exception):  # the broker or Redis down: say it all the same
                refresh.retry_sooner(provider_id=provider_id)
        metrics.UNAVAILABLE.labels(self.name, "failing").inc()
        raise TokenUnavailable(
            self.name, f"last refresh error: {state.last_error or 'failed'}; not retried yet"
        )

    def _remember(self, cached: CachedToken, now: float, generation: int) -> None:
        """Keep ``cached`` in this process's memory (the one conversion to a memory entry)."""
        if cached.refresh_at is not None and now >= cached.refresh_at:
            # Within the margin: still valid, but ask for a new one (beat may be late or down).
            self._request_refresh()
            until = cached.expires_at if cached.expires_at is not None else math.inf
        else:
            until = cached.refresh_at if cached.refresh_at is not None else math.inf
        until = min(until, now + _listener.max_age())
        if _listener.generation(self.name) == generation:  # no news arrived while we read
            _memory[self.name] = (cached.value, until, cached.version, cached.token_type)

    def _request_refresh(self, *, failing: bool | None = None) -> None:
        """Ask for a refresh unless one was asked for already (fleet-wide, by a Redis claim);
        ``failing``: whether its last refresh failed, when the caller read its state."""
        if self.provider_id is None:
            return
        try:
            if not locks.pending_claim(self.provider_id):
                return  # somebody already asked; their refresh will wake us
        except CacheUnavailable:
            self._problem("Redis unavailable")
            return
        if failing is None:
            try:
                failing = selectors.provider_is_failing(provider_id=self.provider_id)
            except DatabaseError:
                failing = False
        try:
            # Now, without the broker's publish retries: a reader is waiting.
            queue.refresh_send(
                provider_id=self.provider_id,
                name=self.name,
                reason=Reason.READER,
                failing=failing,
                after_commit=False,
                retry=False,
            )
        except Exception as error:  # broker down: nothing will come, the deadline will tell
            self._problem(f"could not queue a refresh ({type(error).__name__})")
            locks.pending_clear(self.provider_id)

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def reason(self, waited: float) -> str:
        parts: list[str] = []
        if self.provider_id is not None:
            try:
                last_error = selectors.provider_last_error(provider_id=self.provider_id)
            except DatabaseError:
                last_error = ""
            if last_error:
                parts.append(f"last refresh error: {last_error}")
        parts.extend(self.problems)
        if not parts:
            parts.append("no token was stored")
        return f"waited {waited:.1f}s; " + "; ".join(parts)


def _get_token_slow(name: Any, timeout: Any) -> tuple[str, str]:
    wait = _check_arguments(name, timeout)
    started = time.monotonic()
    deadline = started + wait
    _listener.ensure_running()
    reader = _Reader(name, deadline)
    # Register as a waiter before reading, and read again once subscribed: a token stored
    # between our read and our wait still wakes us.
    waited = False
    database = True
    soon = RUNNING_RECHECK
    with _listener.waiter(name) as woken:
        while True:
            woken.clear()
            value = reader.read(database=database)
            if value is not None:
                return value
            remaining = min(deadline, reader.deadline) - time.monotonic()
            if remaining <= 0:
                metrics.TIMEOUTS.labels(name).inc()
                raise TokenUnavailable(name, reader.reason(time.monotonic() - started))
            if not waited:
                waited = True
                metrics.WAITS.labels(name).inc()
            else:
                # Still waiting after a re-check: the refresh may need our connection more.
                _release_database_connection()
            if not _listener.connected.is_set():
                if _listener.connected.wait(min(remaining, 0.2)):
                    continue  # just subscribed: read again before waiting
                recheck = 0.1
            else:
                recheck = tokens_settings.seconds("WAIT_RECHECK")
                if reader.failing_state is not None:
                    recheck, soon = min(recheck, soon), soon * 2
            notified = woken.wait(min(remaining, recheck))
            if notified:
                soon = RUNNING_RECHECK
            # While notifications flow, re-checks read Redis only: a store always reaches
            # Redis before its notification. A notification (the provider changed?) or a lost
            # channel sends the next read to the database too.
            database = notified or not _listener.connected.is_set()


def _release_database_connection() -> None:
    """Close this thread's idle database connection before a wait of up to seconds (not
    inside a transaction): many waiting threads must not hold the connections that the
    refresh they wait for needs."""
    if not connection.in_atomic_block:
        connection.close()
