"""The writes: refresh a provider's token, invalidate it, keep beat's schedule in step."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from redis.exceptions import LockError
from redis.lock import Lock

from tokens import crypto, metrics, store
from tokens.conf import tokens_settings
from tokens.exceptions import GeneratorError
from tokens.generators import GeneratedToken, get_generator
from tokens.models import Provider, ProviderState, Token
from tokens.sanitize import scrub

logger = logging.getLogger("tokens.refresh")

REFRESH_TASK = "tokens.refresh_token"
SCHEDULE_PREFIX = "tokens.refresh:"


class Reason(enum.StrEnum):
    """Why a refresh runs; it decides which skips apply."""

    SCHEDULE = "schedule"  # beat's periodic run
    READER = "reader"  # get_token() found no valid token, or one near expiry
    RETRY = "retry"  # the backoff after a transient failure is over
    MANUAL = "manual"  # an operator, a new provider or a config change: skip nothing


class Outcome(enum.StrEnum):
    STORED = "stored"
    FRESH = "skipped-fresh"
    BACKOFF = "skipped-backoff"
    IN_FLIGHT = "skipped-in-flight"
    DISABLED = "skipped-disabled"
    MISSING = "skipped-missing"
    STALE = "discarded-stale"
    FAILED = "failed"


@dataclass(frozen=True)
class RefreshResult:
    outcome: Outcome
    token: Token | None = None
    error: GeneratorError | None = None
    retry_in: float | None = None


# ---------------------------------------------------------------------------- refresh


def token_refresh(*, provider_id: int, reason: Reason = Reason.SCHEDULE) -> RefreshResult:
    """Refresh one provider's token, at most one refresh per provider at a time fleet-wide.

    Skips (without calling the generator) when the provider is gone or disabled, when another
    refresh holds the lock, and, unless the reason is MANUAL: when its token is still fresh,
    while a transient failure's backoff lasts, and after a permanent failure until the next
    scheduled run. Stores are fenced by version: a late, older refresh never wins.
    """
    provider = Provider.objects.filter(pk=provider_id).first()
    if provider is None:
        return RefreshResult(Outcome.MISSING)
    state = state_of(provider_id)
    early = _skip_reason(provider, state, reason)
    if early is not None:
        _settle_pending(provider_id, early, state)
        return RefreshResult(early)
    lock: Lock | None = store.refresh_lock(provider_id)
    try:
        acquired = bool(lock.acquire()) if lock is not None else False
    except store.StoreError:
        # Without Redis there is no lock; the version fence still keeps stores ordered.
        logger.warning("tokens: Redis unavailable, refreshing %s without the lock", provider.name)
        acquired, lock = True, None
    if not acquired:
        # Readers ask again when the lock expires, in case its holder died mid-refresh.
        with contextlib.suppress(store.StoreError):
            store.hold_pending_for_lock(provider_id)
        return RefreshResult(Outcome.IN_FLIGHT)
    try:
        provider.refresh_from_db()
        state = state_of(provider_id)
        early = _skip_reason(provider, state, reason)
        result = RefreshResult(early) if early is not None else _refresh_locked(provider, state)
    finally:
        _release(lock, provider_id)
    if result.outcome in (Outcome.FAILED, Outcome.BACKOFF):
        state = state_of(provider_id)
    _settle_pending(provider_id, result.outcome, state)
    return result


def release_pending(*, provider_id: int) -> None:
    """Let readers ask for a refresh of ``provider_id`` again at once."""
    with contextlib.suppress(store.StoreError):
        store.clear_pending(provider_id)


def state_of(provider_id: int) -> ProviderState:
    state, _ = ProviderState.objects.get_or_create(provider_id=provider_id)
    return state


def _skip_reason(provider: Provider, state: ProviderState, reason: Reason) -> Outcome | None:
    if not provider.enabled:
        return Outcome.DISABLED
    if reason == Reason.MANUAL:
        return None
    now = timezone.now()
    if state.token_is_fresh(provider.refresh_interval, now):
        return Outcome.FRESH
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


def _settle_pending(provider_id: int, outcome: Outcome, state: ProviderState) -> None:
    """Let readers ask for a refresh again: at once, or after a failure once its backoff ends
    (a permanent failure: not before the provider changes; the schedule still runs)."""
    failed = outcome in (Outcome.BACKOFF, Outcome.FAILED)
    with contextlib.suppress(store.StoreError):
        if failed and state.permanent_error:
            store.hold_pending(provider_id, tokens_settings.seconds("LOCK_TTL"))
        elif failed and state.next_attempt_at is not None:
            remaining = (state.next_attempt_at - timezone.now()).total_seconds()
            store.hold_pending(provider_id, max(remaining, 0.05))
        else:
            store.clear_pending(provider_id)


def _release(lock: Lock | None, provider_id: int) -> None:
    try:
        if lock is not None:
            lock.release()
    except LockError:
        logger.warning("tokens: refresh lock of provider %s expired before release", provider_id)
    except store.StoreError:
        pass


def _next_fence(provider_id: int, *, attempt: bool = False) -> int:
    """Hand out the next version; the row lock of the UPDATE orders concurrent callers."""
    states = ProviderState.objects.filter(provider_id=provider_id)
    changes: dict[str, object] = {"fence": F("fence") + 1}
    if attempt:
        changes["last_attempt_at"] = timezone.now()
    with transaction.atomic():
        states.update(**changes)
        return states.values_list("fence", flat=True).get()


def _refresh_locked(provider: Provider, state: ProviderState) -> RefreshResult:
    fence = _next_fence(provider.pk, attempt=True)
    started = time.monotonic()
    try:
        generated = _generate(provider)
    except GeneratorError as error:
        return _record_failure(provider, state, fence, error, time.monotonic() - started)
    token = _store(provider, fence, generated)
    duration = time.monotonic() - started
    metrics.REFRESH_DURATION.labels(provider.name).observe(duration)
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


def _generate(provider: Provider) -> GeneratedToken:
    try:
        generator = get_generator(provider.kind)
    except LookupError:
        raise GeneratorError(f"unknown generator kind {provider.kind!r}", transient=False) from None
    errors = generator.validate(provider.config, provider.secret)
    if errors:
        problems = "; ".join(message for messages in errors.values() for message in messages)
        raise GeneratorError(f"invalid provider config: {problems}", transient=False)
    try:
        return generator.generate(provider)
    except GeneratorError as error:  # issuer text may echo what we sent: scrub it
        message = scrub(str(error), [provider.secret])
        raise GeneratorError(
            message, transient=error.transient, retry_after=error.retry_after
        ) from None
    except Exception as error:  # a generator bug must not leak its text or kill the worker
        raise GeneratorError(
            f"generator {provider.kind} raised {type(error).__name__}", transient=True
        ) from None


def refresh_deadline(issued_at: datetime, expires_at: datetime | None) -> datetime | None:
    """When readers should ask for a new token: expiry minus a jittered share of the lifetime."""
    if expires_at is None:
        return None
    lifetime = expires_at - issued_at
    margin = lifetime * (tokens_settings.REFRESH_MARGIN * random.uniform(1.0, 1.5))  # noqa: S311
    return expires_at - margin


def _store(provider: Provider, fence: int, generated: GeneratedToken) -> Token | None:
    """Persist the token if ``fence`` is newer than the current version; then cache + notify."""
    now = timezone.now()
    refresh_at = refresh_deadline(now, generated.expires_at)
    with transaction.atomic():
        won = ProviderState.objects.filter(
            provider_id=provider.pk, current_version__lt=fence
        ).update(
            current_version=fence,
            last_refresh_at=now,
            expires_at=generated.expires_at,
            consecutive_failures=0,
            last_error="",
            next_attempt_at=None,
            permanent_error=False,
        )
        if not won:
            return None
        fingerprint = crypto.fingerprint(generated.access_token)
        if Token.objects.filter(provider_id=provider.pk, fingerprint=fingerprint).exists():
            # The issuer handed back a token we already had: refreshing earlier gains nothing.
            logger.warning(
                "refresh got the same token again provider=%s fingerprint=%s",
                provider.name,
                fingerprint,
            )
        token = Token.objects.create(
            provider_id=provider.pk,
            version=fence,
            value=generated.access_token,
            token_type=generated.token_type,
            fingerprint=fingerprint,
            issued_at=now,
            expires_at=generated.expires_at,
            refresh_at=refresh_at,
        )
        _prune_history(provider.pk)
    cache_token(provider, token, publish=True)
    return token


def _prune_history(provider_id: int) -> None:
    keep = max(1, int(tokens_settings.HISTORY))
    versions = list(
        Token.objects.filter(provider_id=provider_id)
        .order_by("-version")
        .values_list("version", flat=True)[keep : keep + 1]
    )
    if versions:
        Token.objects.filter(provider_id=provider_id, version__lte=versions[0]).delete()


def cache_token(provider: Provider, token: Token, *, publish: bool) -> bool:
    """Put ``token`` in Redis (fenced by its version); False when not written or Redis is down."""
    cached = store.CachedToken(
        provider_id=provider.pk,
        version=token.version,
        value=token.value,
        token_type=token.token_type,
        expires_at=token.expires_at.timestamp() if token.expires_at else None,
        refresh_at=token.refresh_at.timestamp() if token.refresh_at else None,
    )
    try:
        return store.put(provider.name, cached, now=time.time(), publish=publish)
    except store.StoreError:
        logger.warning(
            "tokens: Redis unavailable, token of %s stored in the database only", provider.name
        )
        return False


def retry_delay(failures: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter in its upper half, capped by TOKENS_RETRY_MAX."""
    cap = tokens_settings.seconds("RETRY_MAX")
    base = tokens_settings.seconds("RETRY_BASE")
    delay = min(cap, base * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def _record_failure(
    provider: Provider, state: ProviderState, fence: int, error: GeneratorError, duration: float
) -> RefreshResult:
    now = timezone.now()
    metrics.REFRESH_DURATION.labels(provider.name).observe(duration)
    metrics.REFRESHES.labels(provider.name, "failed").inc()
    metrics.REFRESH_FAILURES.labels(provider.name, error.kind).inc()
    message = scrub(f"{error.kind}: {error}", [provider.secret, *_known_tokens(provider)])
    failures = state.consecutive_failures + 1
    if error.transient:
        retry_in: float | None = retry_delay(failures, error.retry_after)
        next_attempt = now + timedelta(seconds=retry_in or 0)
    else:
        # Permanent: no retries; the next scheduled run (or a config change) tries again.
        retry_in = None
        next_attempt = None
    # Only the newest refresh reports: a config change or newer refresh moved the fence on.
    ProviderState.objects.filter(provider_id=provider.pk, fence=fence).update(
        consecutive_failures=F("consecutive_failures") + 1,
        last_error=message,
        last_error_at=now,
        next_attempt_at=next_attempt,
        permanent_error=not error.transient,
    )
    logger.warning(
        "refresh failed provider=%s version=%s error_class=%s failures=%s duration_ms=%d "
        "retry_in=%s outcome=failed error=%s",
        provider.name,
        fence,
        error.kind,
        failures,
        duration * 1000,
        f"{retry_in:.1f}" if retry_in is not None else "none",
        message,
    )
    return RefreshResult(Outcome.FAILED, error=error, retry_in=retry_in)


def _known_tokens(provider: Provider) -> list[str]:
    return [token.value for token in Token.objects.filter(provider=provider)[:3]]


# ---------------------------------------------------------------------------- invalidation


def provider_invalidate(
    *, provider: Provider, reset_failures: bool = False, expected_version: int | None = None
) -> int | None:
    """Void every token of ``provider`` issued so far (config changed, disabled, rejected).

    Moves the fence on, so a refresh already in flight cannot store its (old) token, drops the
    cached entry and tells every process. With ``expected_version``, only if that version is
    still the current one (a stale rejection must not void a newer token). Returns the new
    version floor, or None when nothing was voided.
    """
    state_of(provider.pk)
    with transaction.atomic():
        fence = _next_fence(provider.pk)
        changes: dict[str, object] = {
            "current_version": fence,
            "expires_at": None,
            "last_refresh_at": None,
        }
        if reset_failures:
            changes.update(
                consecutive_failures=0,
                last_error="",
                last_error_at=None,
                next_attempt_at=None,
                permanent_error=False,
            )
        states = ProviderState.objects.filter(provider_id=provider.pk)
        if expected_version is not None:
            states = states.filter(current_version=expected_version)
        if not states.update(**changes):
            return None
    try:
        store.invalidate(provider.name, fence)
    except store.StoreError:
        logger.warning(
            "tokens: Redis unavailable, could not drop the cached token of %s", provider.name
        )
    return fence


def provider_forget(*, name: str) -> None:
    """Drop a deleted provider's cached token and tell every process."""
    try:
        store.forget(name)
    except store.StoreError:
        logger.warning("tokens: Redis unavailable, could not drop the cached token of %s", name)


def refresh_enqueue(*, provider_id: int, reason: Reason = Reason.MANUAL) -> None:
    """Queue a refresh once the current transaction commits (at once outside one)."""
    from tokens.tasks import enqueue

    transaction.on_commit(lambda: enqueue(provider_id, reason, expires=_message_ttl()))


def refresh_for_reader(*, provider_id: int) -> None:
    """Queue a refresh now, without the broker's publish retries (a reader is waiting)."""
    from tokens.tasks import enqueue

    enqueue(provider_id, Reason.READER, expires=_message_ttl(), retry=False)


def _message_ttl() -> float:
    return max(tokens_settings.seconds("PENDING_TTL"), 1.0)


# ---------------------------------------------------------------------------- schedule


def schedule_name(provider_name: str) -> str:
    return f"{SCHEDULE_PREFIX}{provider_name}"


def interval_schedule(every: timedelta) -> IntervalSchedule:
    """The shared IntervalSchedule row for ``every`` (one row per distinct interval)."""
    seconds = max(1, int(every.total_seconds()))
    try:
        schedule, _ = IntervalSchedule.objects.get_or_create(
            every=seconds, period=IntervalSchedule.SECONDS
        )
    except IntervalSchedule.MultipleObjectsReturned:  # concurrent get_or_create made two
        schedule = (
            IntervalSchedule.objects.filter(every=seconds, period=IntervalSchedule.SECONDS)
            .order_by("pk")
            .first()
        )
        assert schedule is not None
    return schedule


def schedule_sync(*, provider: Provider, previous_name: str | None = None) -> str:
    """Make the provider's PeriodicTask match it; returns "created", "updated" or "unchanged".

    Saves only on a real change: each save makes beat reload its whole schedule.
    """
    interval = interval_schedule(provider.refresh_interval)
    seconds = interval.every
    desired: dict[str, object] = {
        "name": schedule_name(provider.name),
        "task": REFRESH_TASK,
        "interval": interval,
        "args": json.dumps([provider.pk]),
        "kwargs": "{}",
        "enabled": provider.enabled,
        "expire_seconds": seconds,  # a refresh message that waited a whole interval is dropped
        "description": f"Refresh the token of provider {provider.name} (managed by tokens).",
    }
    names = {schedule_name(provider.name)}
    if previous_name:
        names.add(schedule_name(previous_name))
    task = PeriodicTask.objects.filter(name__in=names).order_by("pk").first()
    if task is None:
        PeriodicTask.objects.create(**desired)
        return "created"
    changed = [field for field, value in desired.items() if getattr(task, field) != value]
    if not changed:
        return "unchanged"
    for field in changed:
        setattr(task, field, desired[field])
    task.save()
    return "updated"


def schedule_remove(*, provider_name: str) -> bool:
    deleted = False
    for task in PeriodicTask.objects.filter(name=schedule_name(provider_name)):
        task.delete()  # delete() (not a bulk delete) tells beat through PeriodicTasks.changed()
        deleted = True
    return deleted


def schedules_sync_all() -> dict[str, list[str]]:
    """Reconcile every provider with beat; remove schedules of providers that are gone."""
    report: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": [], "removed": []}
    names = set()
    for provider in Provider.objects.all():
        names.add(schedule_name(provider.name))
        report[schedule_sync(provider=provider)].append(provider.name)
    orphans = PeriodicTask.objects.filter(name__startswith=SCHEDULE_PREFIX).exclude(name__in=names)
    for task in orphans:
        report["removed"].append(task.name.removeprefix(SCHEDULE_PREFIX))
        task.delete()
    return report


# ---------------------------------------------------------------------------- keys


def encryption_keys_rotate() -> int:
    """Re-encrypt every stored secret and token with the first key; returns rows rewritten."""
    rewritten = 0
    with transaction.atomic():
        for pk, secret in Provider.objects.values_list("pk", "secret"):
            Provider.objects.filter(pk=pk).update(secret=secret)
            rewritten += 1
        for pk, value in Token.objects.values_list("pk", "value"):
            Token.objects.filter(pk=pk).update(value=value)
            rewritten += 1
    return rewritten
