"""Refreshing tokens: at most one refresh per provider at a time fleet-wide, stores fenced by
version, and readers told when they may ask again."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from datetime import timedelta

from django.utils import timezone

from tokens import cache, locks, metrics, queue, selectors
from tokens.cache import CachedToken
from tokens.conf import tokens_settings
from tokens.constants import Outcome, Reason
from tokens.exceptions import CacheUnavailable
from tokens.models import Provider, ProviderState, Token
from tokens.services.attempts import Attempt, Interrupted, More, attempts_run, still_running
from tokens.services.failures import failure_record
from tokens.services.results import RefreshResult
from tokens.services.schedule import next_runs_soon
from tokens.services.versions import (
    fences_next,
    provider_uses_refresh_token,
    tokens_store_many,
)

logger = logging.getLogger("tokens.refresh")

# Stores (and cache writes) happen per group of this many providers: one transaction each.
STORE_GROUP = 10


def token_refresh(*, provider_id: int, reason: Reason = Reason.SCHEDULE) -> RefreshResult:
    """Refresh one provider's token, at most one refresh per provider at a time fleet-wide.

    Skips (without calling the generator) when the provider is gone or disabled, when another
    refresh holds the lock, and, unless the reason is MANUAL: when its token is still fresh,
    while a transient failure's backoff lasts, and after a permanent failure until the next
    scheduled run. Stores are fenced by version: a late, older refresh never wins.
    """
    return refresh_many(provider_ids=[provider_id], reason=reason)[provider_id]


def refresh_many(
    *,
    provider_ids: list[int],
    reason: Reason,
    deadline: float | None = None,
    pull: Callable[[int], list[int]] | None = None,
) -> dict[int, RefreshResult]:
    """``token_refresh`` for several providers, with the same guarantees, in few round trips.

    Locks are taken first (one Redis pipeline) and the providers read once, under them; their
    versions are handed out in one statement. The generators' requests are then in flight
    together (TOKENS_HTTP_CONCURRENCY, at most TOKENS_HTTP_PER_HOST to one endpoint; each within
    its own deadline), so one slow endpoint costs the others nothing; tokens are stored and
    cached as they come, per group of up to STORE_GROUP. Each provider's lock goes (its
    readers' claim settled first) once its token is stored or its failure recorded, or at once
    when it is skipped; a call given up keeps it until it expires. An id given twice is
    refreshed once. While requests are in flight, ``pull`` (the schedule's due providers) is
    asked for as many more as there is room for, and they are refreshed the same way; it never
    returns a provider this call was given before (one claimed again while it is being
    refreshed is the caller's to hand on: two calls of a provider never overlap). A provider
    not yet begun when ``deadline`` (monotonic) has passed is left out of the result: the
    caller hands it on.
    """
    provider_ids = list(dict.fromkeys(provider_ids))  # one call per provider, under its lock
    results: dict[int, RefreshResult] = {}
    settled: set[int] = set()  # readers' claims settled as their locks went
    try:
        held: dict[int, str] | None = locks.locks_acquire(provider_ids)
    except CacheUnavailable:
        # Without Redis there is no lock; the version fence still keeps stores ordered.
        logger.warning("tokens: Redis unavailable, refreshing without the lock")
        held = None

    def let_go(provider_ids: Iterable[int]) -> None:
        """Done with these (stored, failed, skipped): their readers' claims settled, then their
        locks released, in one call; kept in ``held`` (released at the end) if Redis fails."""
        if not held:
            return
        done = {pid: held[pid] for pid in provider_ids if pid in held}
        if not done:
            return
        clear, hold = _pending_rules({pid: results[pid] for pid in done if pid in results})
        if locks.locks_release(done, clear=clear, hold=hold):
            for pid in done:
                held.pop(pid, None)
            settled.update(done)

    stopped_by: BaseException | None = None  # a time limit, raised once all is let go
    try:
        due = _due_now(provider_ids, reason, held, results)
        more: More | None = None
        if pull is not None and held is not None:
            locked = held  # no lock, no pulling: Redis is down

            def more(room: int) -> tuple[list[Provider], dict[int, int]]:
                ids = list(dict.fromkeys(pull(room)))
                if not ids:
                    return [], {}
                locked.update(locks.locks_acquire(ids))
                now_due = _due_now(ids, reason, locked, results)
                let_go(pid for pid in ids if pid in results)  # skipped: fresh, disabled, ...
                return _begin_list(now_due, results)

        if due and (deadline is None or time.monotonic() < deadline):
            let_go(pid for pid in provider_ids if pid in results)  # skipped: not kept waiting
            try:
                _refresh_due(*_begin_list(due, results), deadline, held, results, more, let_go)
            except Interrupted as stopped:
                results.update(_record_failures(stopped.attempts))
                stopped_by = stopped.limit
    finally:
        # What is still held: released, the readers' claims of those with a result settled in
        # the same call (never under a lock another refresh has taken since).
        let_go(list(held or ()))
    _settle_pending(results, settled)  # those whose lock was not ours to release
    if stopped_by is not None:
        raise stopped_by from None
    return results


def _due_now(
    provider_ids: list[int],
    reason: Reason,
    held: dict[int, str] | None,
    results: dict[int, RefreshResult],
) -> list[Provider]:
    """Of ``provider_ids``, those to refresh now (read under their lock, from ``held``; None:
    Redis is down); the others' results are added to ``results``."""
    locked = list(provider_ids) if held is None else [pid for pid in provider_ids if pid in held]
    busy = [pid for pid in provider_ids if held is not None and pid not in held]
    if busy:
        # Readers ask again when the lock expires, in case its holder died mid-refresh. A
        # refresh asked for now may find a holder with an old config, or one that found the
        # token fresh: the schedule takes it over rather than drop it.
        locks.pending_hold_for_locks(busy)
        if reason == Reason.MANUAL:
            next_runs_soon(provider_ids=busy)
        results.update((pid, RefreshResult(Outcome.IN_FLIGHT)) for pid in busy)
    providers = selectors.providers_for_refresh(provider_ids=locked)
    stateless = [pid for pid, provider in providers.items() if provider.state_or_none is None]
    if stateless:  # made by bulk_create: their state row first
        ProviderState.objects.ensure(stateless)
        providers.update(selectors.providers_for_refresh(provider_ids=stateless))
    due: list[Provider] = []
    for pid in locked:
        provider = providers.get(pid)
        if provider is None:
            results[pid] = RefreshResult(Outcome.MISSING)
            continue
        state = provider.refresh_state
        early = _skip_reason(provider, state, reason)
        if early == Outcome.FRESH and reason == Reason.SCHEDULE:
            _schedule_for_expiry(state)
        if early is None and held is None and provider_uses_refresh_token(provider):
            # A refresh token the issuer rotates is never used without the fleet-wide
            # lock: two refreshes sending it at once would end the grant.
            early = Outcome.IN_FLIGHT
        if early is None:
            due.append(provider)
        else:
            results[pid] = RefreshResult(
                early, retry_at=state.next_attempt_at, permanent=state.permanent_error
            )
    return due


def retry_sooner(*, provider_id: int) -> None:
    """Readers want a token that no longer exists: bring a far retry of a transient failure
    forward to within TOKENS_RETRY_MAX_WANTED (once per that period, fleet-wide), so the token
    is back within seconds of the endpoint healing."""
    cap = max(1.0, tokens_settings.seconds("RETRY_MAX_WANTED"))  # at most one a second
    try:
        if not locks.claim("soon", provider_id, cap):
            return
    except CacheUnavailable:
        return
    soon = timezone.now() + timedelta(seconds=cap)
    moved = ProviderState.objects.filter(
        provider_id=provider_id, permanent_error=False, next_attempt_at__gt=soon
    ).update(next_attempt_at=soon)
    if moved:
        queue.retry_send(provider_id=provider_id, retry_in=cap)


def refresh_for_operator(*, provider_id: int, name: str | None = None) -> bool:
    """Send an operator's "Refresh now", at most once per provider per TOKENS_HTTP_TIMEOUT
    (repeated clicks, or a script posting them, cannot send a refresh each); False when one
    was asked for moments ago."""
    try:
        claimed = locks.claim("manual", provider_id, tokens_settings.seconds("HTTP_TIMEOUT"))
    except CacheUnavailable:
        claimed = True  # without Redis there is no claim; the lock still serializes refreshes
    if claimed:
        failing = selectors.provider_is_failing(provider_id=provider_id)
        queue.refresh_send(
            provider_id=provider_id, reason=Reason.MANUAL, failing=failing, name=name
        )
    return claimed


def _schedule_for_expiry(state: ProviderState) -> None:
    """A scheduled run found the token fresh (stored outside the schedule: Refresh now, a
    reader, a change): the next run must still come before this token stops being handed out,
    not one interval on."""
    due = state.next_refresh_for_expiry()
    if due is not None:
        ProviderState.objects.filter(provider_id=state.provider_id, next_run_at__gt=due).update(
            next_run_at=due
        )


def _skip_reason(provider: Provider, state: ProviderState, reason: Reason) -> Outcome | None:
    if not provider.enabled:
        return Outcome.DISABLED
    if reason == Reason.MANUAL:
        return None
    now = timezone.now()
    if state.token_is_fresh(provider.refresh_interval, now):
        return Outcome.FRESH
    if state.reconnect_needed:
        # The grant is gone: only a person (Connect, a new refresh token) or "Refresh now".
        return Outcome.BACKOFF
    if state.permanent_error:
        # Retrying will not help: only the schedule (once per interval) or a change tries again.
        if reason != Reason.SCHEDULE:
            return Outcome.BACKOFF
        recent = state.last_attempt_at is not None and (
            now - state.last_attempt_at < provider.refresh_interval / 2
        )
        return Outcome.BACKOFF if recent else None
    if state.next_attempt_at is not None and now < state.next_attempt_at:
        return Outcome.BACKOFF
    return None


def _begin_list(
    providers: list[Provider], results: dict[int, RefreshResult]
) -> tuple[list[Provider], dict[int, int]]:
    """Of ``providers``, those to call now, with their versions (fences); the others (a call
    given up earlier still runs in this process, deleted meanwhile) are added to ``results``."""
    running = still_running(provider_ids=[p.pk for p in providers])
    results.update((pid, RefreshResult(Outcome.IN_FLIGHT)) for pid in running)
    providers = [p for p in providers if p.pk not in running]
    if not providers:
        return [], {}
    fences = fences_next(provider_ids=[p.pk for p in providers])
    gone = [p for p in providers if p.pk not in fences]  # deleted since they were read
    results.update((p.pk, RefreshResult(Outcome.MISSING)) for p in gone)
    return [p for p in providers if p.pk in fences], fences


def _refresh_due(
    providers: list[Provider],
    fences: dict[int, int],
    deadline: float | None,
    held: dict[int, str] | None,
    results: dict[int, RefreshResult],
    more: More | None,
    let_go: Callable[[Iterable[int]], None],
) -> None:
    """Refresh ``providers`` (and what ``more`` adds), adding each one's result to ``results``
    as it comes (a time limit that stops the batch keeps the results of those stored before
    it); each one is let go (``let_go``: its lock released) as soon as it is stored or its
    failure recorded."""
    if not providers:
        return

    def finished(attempts: list[Attempt]) -> None:
        # Stored (and cached, and announced) as they come: a slow endpoint in the batch never
        # holds back the others' tokens.
        results.update(_record_failures([a for a in attempts if a.generated is None]))
        made = [a for a in attempts if a.generated is not None]
        for start in range(0, len(made), STORE_GROUP):
            _store_group(made[start : start + STORE_GROUP], results)
        # Their locks go now, not when the batch ends, so that a refresh asked for meanwhile
        # (Refresh now, a rejected token) runs at once. A call given up is no longer in
        # ``held``: its lock stays until it expires.
        let_go(a.provider.pk for a in attempts)

    attempts_run(
        providers=providers,
        fences=fences,
        deadline=deadline,
        held=held,
        on_finished=finished,
        group=STORE_GROUP,
        more=more,
    )


def _store_group(group: list[Attempt], results: dict[int, RefreshResult]) -> None:
    """Store a group of new tokens in one transaction (those with a rotated refresh token are
    committed already), cache them in one round trip, and report each."""
    pending = [a for a in group if not a.committed]
    late = iter(
        tokens_store_many(
            items=[(a.provider, a.fence, a.generated, a.attempted) for a in pending]  # type: ignore[misc]
        )
    )
    stored = [a.stored if a.committed else next(late) for a in group]
    _cache_stored([(a.provider, token) for a, token in zip(group, stored, strict=True)])
    for attempt, token in zip(group, stored, strict=True):
        results[attempt.provider.pk] = _report_stored(
            attempt.provider, attempt.fence, token, attempt.duration
        )


def _record_failures(attempts: list[Attempt]) -> dict[int, RefreshResult]:
    results = {}
    for attempt in attempts:
        assert attempt.error is not None
        results[attempt.provider.pk] = failure_record(
            provider=attempt.provider,
            fence=attempt.fence,
            error=attempt.error,
            duration=attempt.duration,
            attempted=attempt.attempted,
        )
    return results


def _cache_stored(stored: list[tuple[Provider, Token | None]]) -> None:
    """Cache the tokens that won their store and tell every process (one round trip)."""
    entries = [(p.name, CachedToken.from_row(token)) for p, token in stored if token is not None]
    try:
        cache.entries_put(entries, now=time.time(), publish=True)
    except CacheUnavailable:
        logger.warning(
            "tokens: Redis unavailable, %s token(s) stored in the database only (%s)",
            len(entries),
            ", ".join(name for name, _ in entries[:5]),
        )


def _report_stored(
    provider: Provider, fence: int, token: Token | None, duration: float
) -> RefreshResult:
    metrics.REFRESH_DURATION.labels(provider.kind).observe(duration)
    metrics.REFRESHES.labels(provider.name, "stored" if token else "stale").inc()
    if token is None:
        logger.info(
            "refresh discarded provider=%s version=%s outcome=stale duration_ms=%d",
            provider.name,
            fence,
            duration * 1000,
        )
        return RefreshResult(Outcome.STALE)
    logger.info(
        "refresh stored provider=%s version=%s fingerprint=%s expires_at=%s duration_ms=%d "
        "outcome=stored",
        provider.name,
        token.version,
        token.fingerprint,
        token.expires_at.isoformat() if token.expires_at else "never",
        duration * 1000,
    )
    return RefreshResult(Outcome.STORED, token=token)


def _settle_pending(results: dict[int, RefreshResult], settled: set[int]) -> None:
    """Settle the readers' claims of ``results`` not in ``settled`` (``_pending_rules``)."""
    clear, hold = _pending_rules(
        {pid: result for pid, result in results.items() if pid not in settled}
    )
    locks.pending_settle(clear=clear, hold=hold)


def _pending_rules(results: dict[int, RefreshResult]) -> tuple[list[int], dict[int, float]]:
    """When readers may ask for a refresh again (the "pending" claim's new lifetime): the ids
    they may ask again for at once, and those they may ask again for after so many seconds.

    After a token was stored (or found fresh): after TOKENS_READER_COOLDOWN, so a token that is
    useless at once cannot turn each read into an endpoint call. After a transient failure: once
    its retry (sent on the scheduled queue) has had the time to run, so readers of a failing
    provider add no calls of their own. After a permanent failure: not before the lock TTL (the
    schedule still runs). A provider whose lock another refresh holds is left to that refresh.
    """
    clear: list[int] = []
    hold: dict[int, float] = {}
    now = timezone.now()
    cooldown = tokens_settings.seconds("READER_COOLDOWN")
    for pid, result in results.items():
        failed = result.outcome in (Outcome.BACKOFF, Outcome.FAILED)
        if result.outcome == Outcome.IN_FLIGHT:
            continue
        if failed and result.permanent:
            hold[pid] = tokens_settings.seconds("LOCK_TTL")
        elif failed and result.retry_at is not None:
            until_retry = (result.retry_at - now).total_seconds()
            hold[pid] = max(until_retry, 0.0) + tokens_settings.seconds("HTTP_TIMEOUT") + 1.0
        elif result.outcome in (Outcome.STORED, Outcome.FRESH) and cooldown > 0:
            hold[pid] = cooldown
        else:
            clear.append(pid)
    return clear, hold
