"""The writes: refresh a provider's token, invalidate it, keep beat's schedule in step."""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta

from billiard.common import (  # type: ignore[attr-defined]
    terminate_handler_fired as billiard_terminating,
)
from django.db import DatabaseError, connections, router, transaction
from django.db.models import (
    Case,
    DateTimeField,
    ExpressionWrapper,
    F,
    OuterRef,
    Subquery,
    TextField,
    Value,
    When,
)
from django.db.models.functions import Cast, Greatest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from tokens import crypto, metrics, store
from tokens.conf import tokens_settings
from tokens.exceptions import TIME_LIMITS, GeneratorError, KeyRotationRefused
from tokens.generators import GeneratedToken, get_generator
from tokens.generators.base import check_generated
from tokens.models import Provider, ProviderState, Token
from tokens.sanitize import WITHHELD, echoes, scrub
from tokens.status import state_or_none

logger = logging.getLogger("tokens.refresh")

REFRESH_TASK = "tokens.refresh_token"
BATCH_TASK = "tokens.refresh_batch"
DISPATCH_TASK = "tokens.dispatch_due"
DISPATCH_SCHEDULE = "tokens.dispatch"  # beat's one entry (a PeriodicTask)
LEGACY_SCHEDULE_PREFIX = "tokens.refresh:"  # per-provider entries of earlier versions


class Reason(enum.StrEnum):
    """Why a refresh runs; it decides which skips apply."""

    SCHEDULE = "schedule"  # the schedule's run (a batch sent by the dispatcher)
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
    error: str | None = None  # after a failure: the sanitized message (as stored)
    retry_in: float | None = None
    # After a failure or during a backoff: when readers may ask again, or never (permanent).
    retry_at: datetime | None = None
    permanent: bool = False


# ---------------------------------------------------------------------------- refresh


def token_refresh(*, provider_id: int, reason: Reason = Reason.SCHEDULE) -> RefreshResult:
    """Refresh one provider's token, at most one refresh per provider at a time fleet-wide.

    Skips (without calling the generator) when the provider is gone or disabled, when another
    refresh holds the lock, and, unless the reason is MANUAL: when its token is still fresh,
    while a transient failure's backoff lasts, and after a permanent failure until the next
    scheduled run. Stores are fenced by version: a late, older refresh never wins.
    """
    return refresh_many([provider_id], reason=reason)[provider_id]


def refresh_many(
    provider_ids: list[int], *, reason: Reason, deadline: float | None = None
) -> dict[int, RefreshResult]:
    """``token_refresh`` for several providers, with the same guarantees, in few round trips.

    Locks are taken first (one Redis pipeline) and the providers read once, under them; their
    versions are handed out in one statement. The generators then run TOKENS_REFRESH_CONCURRENCY
    at a time (each HTTP call within its own deadline), so one slow endpoint costs the others
    nothing; tokens are stored and cached per group of STORE_GROUP. A provider not yet begun
    when ``deadline`` (monotonic) has passed is left out of the result: the caller hands it on.
    """
    results: dict[int, RefreshResult] = {}
    try:
        held: dict[int, str] | None = store.acquire_locks(provider_ids)
    except store.StoreError:
        # Without Redis there is no lock; the version fence still keeps stores ordered.
        logger.warning("tokens: Redis unavailable, refreshing without the lock")
        held = None
    locked = list(provider_ids) if held is None else [pid for pid in provider_ids if pid in held]
    busy = [pid for pid in provider_ids if held is not None and pid not in held]
    if busy:
        _lock_taken(busy, reason)
        results.update((pid, RefreshResult(Outcome.IN_FLIGHT)) for pid in busy)
    try:
        providers = load_for_refresh(locked)
        due: list[Provider] = []
        for pid in locked:
            provider = providers.get(pid)
            if provider is None:
                results[pid] = RefreshResult(Outcome.MISSING)
                continue
            state = provider.refresh_state
            early = _skip_reason(provider, state, reason)
            if early is None:
                due.append(provider)
            else:
                results[pid] = RefreshResult(
                    early, retry_at=state.next_attempt_at, permanent=state.permanent_error
                )
        if due and (deadline is None or time.monotonic() < deadline):
            try:
                results.update(_refresh_due(due, deadline, held))
            except TIME_LIMITS:
                _settle_pending(results)
                raise
    finally:
        if held:
            _release_locks(held)
    _settle_pending(results)
    return results


STORE_GROUP = 10


def _lock_taken(provider_ids: list[int], reason: Reason) -> None:
    # Readers ask again when the lock expires, in case its holder died mid-refresh.
    with contextlib.suppress(store.StoreError):
        store.hold_pending_for_locks(provider_ids)
    if reason == Reason.MANUAL:
        # The holder may be a refresh with an old config, or one that found the token fresh:
        # hand a refresh asked for now to the schedule (the next dispatch) instead of dropping it.
        ProviderState.objects.filter(provider_id__in=provider_ids).update(
            next_run_at=timezone.now()
        )


@dataclass
class _Attempt:
    """One generator call: its provider, version, when it began, and what came of it."""

    provider: Provider
    fence: int
    attempted: datetime
    started: float
    generated: GeneratedToken | None = None
    error: GeneratorError | None = None
    finished: float | None = None
    thread: threading.Thread | None = None

    @property
    def duration(self) -> float:
        return (self.finished or time.monotonic()) - self.started


# Generator calls given up while still running, by provider: no second call of a provider is
# begun in this process while its first still runs (a callable that never returns costs one
# thread, not one per attempt).
_abandoned: dict[int, threading.Thread] = {}


def _refresh_due(
    providers: list[Provider], deadline: float | None, held: dict[int, str] | None
) -> dict[int, RefreshResult]:
    results: dict[int, RefreshResult] = {}
    for pid, thread in list(_abandoned.items()):
        if not thread.is_alive():
            del _abandoned[pid]
    still = [p for p in providers if p.pk in _abandoned]
    results.update((p.pk, RefreshResult(Outcome.IN_FLIGHT)) for p in still)
    providers = [p for p in providers if p.pk not in _abandoned]
    if not providers:
        return results
    fences = _next_fences([p.pk for p in providers])
    gone = [p for p in providers if p.pk not in fences]  # deleted since they were read
    results.update((p.pk, RefreshResult(Outcome.MISSING)) for p in gone)
    attempts = _run_generators([p for p in providers if p.pk in fences], fences, deadline, held)
    failed = [a for a in attempts if a.generated is None]
    for attempt in failed:
        assert attempt.error is not None
        results[attempt.provider.pk] = _record_failure(
            attempt.provider, attempt.fence, attempt.error, attempt.duration, attempt.attempted
        )
    made = [a for a in attempts if a.generated is not None]
    for start in range(0, len(made), STORE_GROUP):
        group = made[start : start + STORE_GROUP]
        stored = _store_many(
            [(a.provider, a.fence, a.generated, a.attempted) for a in group]  # type: ignore[misc]
        )
        for attempt, token in zip(group, stored, strict=True):
            results[attempt.provider.pk] = _report_stored(
                attempt.provider, attempt.fence, token, attempt.duration
            )
    return results


def _run_generators(
    providers: list[Provider],
    fences: dict[int, int],
    deadline: float | None,
    held: dict[int, str] | None,
) -> list[_Attempt]:
    """Call each provider's generator: one here, in this thread (a time limit interrupts it);
    several on a pool of TOKENS_REFRESH_CONCURRENCY threads. Those not begun by ``deadline``
    are left out. A call still running HTTP_TIMEOUT after the deadline (a callable that hangs)
    is given up as failed, and its provider's lock is kept until it expires, so no second call
    can overlap it."""
    if len(providers) == 1:
        attempt = _Attempt(providers[0], fences[providers[0].pk], timezone.now(), time.monotonic())
        try:
            _attempt(attempt)
        except TIME_LIMITS:
            # The call was interrupted (the limit was raised inside it): its lock may go.
            _stopped_by_time_limit([attempt], None)
            raise
        return [attempt]
    workers = max(1, min(len(providers), int(tokens_settings.REFRESH_CONCURRENCY)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokens-refresh")
    started: list[_Attempt] = []
    begun = threading.Lock()

    def job(provider: Provider) -> _Attempt | None:
        with begun:
            if deadline is not None and time.monotonic() >= deadline:
                return None  # not begun: the caller hands it on
            attempt = _Attempt(provider, fences[provider.pk], timezone.now(), time.monotonic())
            attempt.thread = threading.current_thread()
            started.append(attempt)
        try:
            return _attempt(attempt)
        finally:
            connections.close_all()  # a callable may have opened one in this thread

    futures = [pool.submit(job, provider) for provider in providers]
    grace = deadline + tokens_settings.seconds("HTTP_TIMEOUT") if deadline is not None else None
    try:
        wait(futures, timeout=None if grace is None else max(0.0, grace - time.monotonic()))
    except TIME_LIMITS:
        pool.shutdown(wait=False, cancel_futures=True)
        with begun:
            running = [a for a in started if a.finished is None]
        _stopped_by_time_limit(running, held)
        raise
    pool.shutdown(wait=False, cancel_futures=True)
    with begun:
        attempts = list(started)
    for attempt in attempts:
        if attempt.finished is None:
            _give_up(
                attempt,
                GeneratorError(
                    f"generator {attempt.provider.kind} did not return within "
                    f"{attempt.duration:.0f}s; given up",
                    transient=True,
                    retry_after=attempt.duration,
                ),
                held,
            )
    return attempts


def _attempt(attempt: _Attempt) -> _Attempt:
    try:
        attempt.generated = _generate(attempt.provider)
    except GeneratorError as error:
        attempt.error = error
    finally:
        attempt.finished = time.monotonic()
    return attempt


def _give_up(attempt: _Attempt, error: GeneratorError, held: dict[int, str] | None) -> None:
    """A generator call still running: report it failed, keep its lock (it expires by TTL)."""
    attempt.error = error
    attempt.generated = None
    attempt.finished = attempt.finished or time.monotonic()
    if held is not None:
        held.pop(attempt.provider.pk, None)
    if attempt.thread is not None and attempt.thread is not threading.current_thread():
        _abandoned[attempt.provider.pk] = attempt.thread


def _stopped_by_time_limit(attempts: list[_Attempt], held: dict[int, str] | None) -> None:
    """The task's time limit stopped these calls: not the generators' failure, and not to be
    retried at once. Each is recorded as a transient failure that waits at least as long as it
    ran, and readers are held off as long. A pool's calls run on: their locks (``held``) are
    kept until they expire."""
    results = {}
    for attempt in attempts:
        _give_up(
            attempt,
            GeneratorError(
                f"refresh stopped by the task's time limit after {attempt.duration:.0f}s "
                "(CELERY_TASK_SOFT_TIME_LIMIT)",
                transient=True,
                retry_after=attempt.duration,
            ),
            held,
        )
        assert attempt.error is not None
        results[attempt.provider.pk] = _record_failure(
            attempt.provider, attempt.fence, attempt.error, attempt.duration, attempt.attempted
        )
    _settle_pending(results)


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


def release_pending(*, provider_id: int) -> None:
    """Let readers ask for a refresh of ``provider_id`` again at once."""
    with contextlib.suppress(store.StoreError):
        store.clear_pending(provider_id)


def state_of(provider_id: int) -> ProviderState:
    state, _ = ProviderState.objects.get_or_create(provider_id=provider_id)
    return state


def load_for_refresh(provider_ids: list[int]) -> dict[int, Provider]:
    """The providers with their refresh state, in one query."""
    if not provider_ids:
        return {}
    providers = {
        provider.pk: provider
        for provider in Provider.objects.select_related("refresh_state").filter(pk__in=provider_ids)
    }
    for provider in providers.values():
        if state_or_none(provider) is None:  # made by bulk_create
            provider.refresh_state = state_of(provider.pk)
    return providers


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


def _settle_pending(results: dict[int, RefreshResult]) -> None:
    """When readers may ask for a refresh again (the "pending" claim's new lifetime).

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
    with contextlib.suppress(store.StoreError):
        store.settle_pending(clear=clear, hold=hold)


def _release_locks(held: dict[int, str]) -> None:
    try:
        for provider_id in store.release_locks(held):
            logger.warning(
                "tokens: refresh lock of provider %s expired before release", provider_id
            )
    except store.StoreError:
        pass


def _next_fences(provider_ids: list[int]) -> dict[int, int]:
    """Hand out the next version of each provider in one statement; the row locks order
    concurrent callers. Providers without a state row (deleted) are left out."""
    if not provider_ids:
        return {}
    connection = connections[router.db_for_write(ProviderState)]
    quote = connection.ops.quote_name
    marks = ", ".join(["%s"] * len(provider_ids))
    # Identifiers are the model's own, quoted; values are parameters.
    sql = (
        f"UPDATE {quote(ProviderState._meta.db_table)} "  # noqa: S608
        f"SET {quote('fence')} = {quote('fence')} + 1 "
        f"WHERE {quote('provider_id')} IN ({marks}) "
        f"RETURNING {quote('provider_id')}, {quote('fence')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, list(provider_ids))
        return {int(pid): int(fence) for pid, fence in cursor.fetchall()}


def _next_fence(provider_id: int) -> int:
    fence = _next_fences([provider_id]).get(provider_id)
    if fence is None:
        raise ProviderState.DoesNotExist(f"no refresh state for provider {provider_id}")
    return fence


def _generate(provider: Provider) -> GeneratedToken:
    """The provider's generator's token, checked; GeneratorError for anything else.

    Whatever a generator raises ends here as a GeneratorError, BaseException included (a
    ``sys.exit`` in a callable must not take a worker down), except Celery's time limits, which
    belong to the task. Messages are scrubbed later, with the provider's secret and tokens.
    """
    try:
        generator = get_generator(provider.kind)
    except LookupError:
        raise GeneratorError(f"unknown generator kind {provider.kind!r}", transient=False) from None
    errors = generator.validate(provider.config, provider.secret)
    if errors:
        problems = "; ".join(message for messages in errors.values() for message in messages)
        raise GeneratorError(f"invalid provider config: {problems}", transient=False)
    try:
        return check_generated(generator.generate(provider))
    except (GeneratorError, *TIME_LIMITS):
        raise
    except Exception as error:  # a generator bug must not leak its text
        raise GeneratorError(
            f"generator {provider.kind} raised {type(error).__name__}", transient=True
        ) from None
    except BaseException as error:  # SystemExit, KeyboardInterrupt: never the worker's end
        if _process_is_stopping(error):
            raise
        raise GeneratorError(
            f"generator {provider.kind} raised {type(error).__name__}", transient=False
        ) from None


def _process_is_stopping(error: BaseException) -> bool:
    """Whether ``error`` is this process being stopped (not the generator's doing): a worker's
    shutdown signal (billiard's handler raised it), or Ctrl-C where Ctrl-C reaches Python."""
    if billiard_terminating():
        return True
    return (
        isinstance(error, KeyboardInterrupt)
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # pool processes ignore it
    )


def refresh_deadline(issued_at: datetime, expires_at: datetime | None) -> datetime | None:
    """When readers should ask for a new token: expiry minus a jittered share of the lifetime."""
    if expires_at is None:
        return None
    lifetime = expires_at - issued_at
    margin = lifetime * (tokens_settings.REFRESH_MARGIN * random.uniform(1.0, 1.5))  # noqa: S311
    return expires_at - margin


def _store(
    provider: Provider, state: ProviderState, fence: int, generated: GeneratedToken
) -> Token | None:
    """Persist one token (see ``_store_many``)."""
    provider.refresh_state = state
    return _store_many([(provider, fence, generated, timezone.now())])[0]


def _store_many(
    items: list[tuple[Provider, int, GeneratedToken, datetime]],
) -> list[Token | None]:
    """Persist each token whose version is newer than its provider's current one, in one
    transaction, then cache and notify (one Redis round trip). None where a newer one won."""
    if not items:
        return []
    now = timezone.now()
    results: list[Token | None] = []
    won: list[tuple[Provider, Token]] = []
    with transaction.atomic():
        for provider, fence, generated, attempted in items:
            fingerprint = crypto.fingerprint(generated.access_token)
            updated = ProviderState.objects.filter(
                provider_id=provider.pk, current_version__lt=fence
            ).update(
                current_version=fence,
                last_refresh_at=now,
                last_attempt_at=attempted,
                expires_at=generated.expires_at,
                consecutive_failures=0,
                last_error="",
                next_attempt_at=None,
                permanent_error=False,
                fingerprint=fingerprint,
            )
            if not updated:
                results.append(None)
                continue
            if fingerprint == provider.refresh_state.fingerprint:
                # The issuer handed back the token we had: refreshing earlier gains nothing.
                logger.warning(
                    "refresh got the same token again provider=%s fingerprint=%s",
                    provider.name,
                    fingerprint,
                )
            token = Token(
                provider_id=provider.pk,
                version=fence,
                value=generated.access_token,
                token_type=generated.token_type,
                fingerprint=fingerprint,
                issued_at=now,
                expires_at=generated.expires_at,
                refresh_at=refresh_deadline(now, generated.expires_at),
            )
            won.append((provider, token))
            results.append(token)
        if won:
            Token.objects.bulk_create([token for _, token in won])
            _prune_history([provider.pk for provider, _ in won])
    cache_tokens(won, publish=True)
    return results


def _prune_history(provider_ids: list[int]) -> None:
    """Keep each provider's newest TOKENS_HISTORY tokens, in one statement."""
    keep = max(1, int(tokens_settings.HISTORY))
    oldest_kept = (
        Token.objects.filter(provider_id=OuterRef("provider_id"))
        .order_by("-version")
        .values("version")[keep : keep + 1]
    )
    Token.objects.filter(provider_id__in=provider_ids, version__lte=Subquery(oldest_kept)).delete()


def cache_token(provider: Provider, token: Token, *, publish: bool) -> bool:
    """Put ``token`` in Redis (fenced by its version); False when not written or Redis is down."""
    return cache_tokens([(provider, token)], publish=publish)[0]


def cache_tokens(entries: list[tuple[Provider, Token]], *, publish: bool) -> list[bool]:
    """``cache_token`` for several, in one round trip."""
    if not entries:
        return []
    cached = [
        (
            provider.name,
            store.CachedToken(
                provider_id=provider.pk,
                version=token.version,
                value=token.value,
                token_type=token.token_type,
                expires_at=token.expires_at.timestamp() if token.expires_at else None,
                refresh_at=token.refresh_at.timestamp() if token.refresh_at else None,
            ),
        )
        for provider, token in entries
    ]
    try:
        return store.put_many(cached, now=time.time(), publish=publish)
    except store.StoreError:
        logger.warning(
            "tokens: Redis unavailable, %s token(s) stored in the database only (%s)",
            len(entries),
            ", ".join(provider.name for provider, _ in entries[:5]),
        )
        return [False] * len(entries)


def retry_delay(failures: int, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter in its upper half, capped by TOKENS_RETRY_MAX."""
    cap = tokens_settings.seconds("RETRY_MAX")
    base = tokens_settings.seconds("RETRY_BASE")
    delay = min(cap, base * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


def _record_failure(
    provider: Provider, fence: int, error: GeneratorError, duration: float, attempted: datetime
) -> RefreshResult:
    now = timezone.now()
    state = provider.refresh_state
    metrics.REFRESH_DURATION.labels(provider.kind).observe(duration)
    metrics.REFRESHES.labels(provider.name, "failed").inc()
    metrics.REFRESH_FAILURES.labels(provider.name, error.kind).inc()
    # The issuer's words (detail) may echo the secret in any encoding: scrubbed with it and the
    # provider's recent tokens before anything is cut, stored or logged.
    secrets = [provider.secret, *_known_tokens(provider)]
    detail = error.detail
    if detail and echoes(detail, secrets):
        detail = WITHHELD
    text = f"{error.kind}: {error}" + (f": {detail}" if detail else "")
    message = scrub(text, secrets)
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
        last_attempt_at=attempted,
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
    return RefreshResult(
        Outcome.FAILED,
        error=message,
        retry_in=retry_in,
        retry_at=next_attempt,
        permanent=not error.transient,
    )


def _known_tokens(provider: Provider) -> list[str]:
    """Every token of the provider still stored (TOKENS_HISTORY): any may be echoed back."""
    return [token.value for token in Token.objects.filter(provider=provider)]


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
            "fingerprint": "",
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

    transaction.on_commit(
        lambda: enqueue(
            provider_id, reason, expires=_message_ttl(), failing=_is_failing(provider_id)
        )
    )


def refresh_for_reader(*, provider_id: int) -> None:
    """Queue a refresh now, without the broker's publish retries (a reader is waiting)."""
    from tokens.tasks import enqueue

    enqueue(
        provider_id,
        Reason.READER,
        expires=_message_ttl(),
        retry=False,
        failing=_is_failing(provider_id),
    )


def refresh_for_operator(*, provider_id: int) -> bool:
    """Queue an operator's "Refresh now", at most once per provider per TOKENS_HTTP_TIMEOUT
    (repeated clicks, or a script posting them, cannot queue a refresh each); False when one
    was asked for moments ago."""
    try:
        claimed = store.claim("manual", provider_id, tokens_settings.seconds("HTTP_TIMEOUT"))
    except store.StoreError:
        claimed = True  # without Redis there is no claim; the lock still serializes refreshes
    if claimed:
        refresh_enqueue(provider_id=provider_id)
    return claimed


def _is_failing(provider_id: int) -> bool:
    """Whether the provider's last refresh failed: its refreshes then go to the scheduled lane
    even when somebody waits for them, so that a hanging endpoint never holds up the urgent
    lane (first tokens of healthy providers, the dispatcher)."""
    try:
        return ProviderState.objects.filter(
            provider_id=provider_id, consecutive_failures__gt=0
        ).exists()
    except DatabaseError:
        return False


def _message_ttl() -> float:
    return max(tokens_settings.seconds("PENDING_TTL"), 1.0)


# ---------------------------------------------------------------------------- schedule
#
# Beat runs one entry, DISPATCH_SCHEDULE, every TOKENS_DISPATCH_EVERY seconds. Its task claims
# the providers whose ``next_run_at`` has come (moving each one interval on) and sends them to
# the workers in batches. A PeriodicTask per provider would make beat reload and compare every
# entry on each change and each send; this keeps beat's work constant however many providers
# there are, and a provider's schedule is its own row (its interval, editable in admin).


def dispatcher_schedule_ensure() -> bool:
    """Create beat's dispatcher entry if it is missing (never re-enables a disabled one).

    Also removes the per-provider entries ("tokens.refresh:<name>") earlier versions made.
    Returns True when something changed.
    """
    every = interval_schedule(tokens_settings.timedelta("DISPATCH_EVERY"))
    queue = tokens_settings.QUEUE_URGENT or None
    entry, created = PeriodicTask.objects.get_or_create(
        name=DISPATCH_SCHEDULE,
        defaults={
            "task": DISPATCH_TASK,
            "interval": every,
            "args": "[]",
            "kwargs": "{}",
            # A dispatch that waited this long is stale: the next one claims the same providers.
            "expire_seconds": max(5, every.every * 5),
            "description": "Sends the token refreshes that are due (managed by tokens).",
            # The urgent queue: scheduled batches (slow endpoints) never hold up the dispatcher.
            "queue": queue,
        },
    )
    moved = False
    if not created and entry.queue != queue:
        entry.queue = queue
        entry.save(update_fields=["queue"])  # save(): tells beat through PeriodicTasks.changed()
        moved = True
    legacy = 0
    for task in PeriodicTask.objects.filter(name__startswith=LEGACY_SCHEDULE_PREFIX):
        task.delete()  # delete(), not a bulk delete: tells beat through PeriodicTasks.changed()
        legacy += 1
    return created or moved or bool(legacy)


def dispatcher_schedule() -> PeriodicTask | None:
    return PeriodicTask.objects.filter(name=DISPATCH_SCHEDULE).first()


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


def _phase(provider_id: int) -> float:
    """A fixed share of the interval, well spread over ids (golden ratio), in [0, 1)."""
    return (provider_id * 0.6180339887498949) % 1.0


def schedule_sync(
    *, provider: Provider, previous: Provider | None = None, created: bool = False
) -> None:
    """Keep the provider's next scheduled refresh in step with it.

    New (or re-enabled): one interval from now (its first token is fetched at once, on
    commit). Interval changed: as if the new interval had always applied, counted from the
    previous run, and never in the past. No schedule yet (bulk_create, an upgrade): a fixed
    phase of the interval, so that many such providers do not all fall due together.
    """
    now = timezone.now()
    interval = provider.refresh_interval
    state = state_of(provider.pk)
    states = ProviderState.objects.filter(provider_id=provider.pk)
    if state.next_run_at is None:
        first = now + (interval if created else interval * _phase(provider.pk))
        states.update(next_run_at=first)
        return
    re_enabled = previous is not None and provider.enabled and not previous.enabled
    if re_enabled:
        states.update(next_run_at=now + interval)
        return
    if previous is not None and previous.refresh_interval != interval:
        # One statement: a dispatch that moves next_run_at on meanwhile is not overwritten.
        states.update(
            next_run_at=Greatest(
                ExpressionWrapper(
                    F("next_run_at") - previous.refresh_interval + interval,
                    output_field=DateTimeField(),
                ),
                Value(now, output_field=DateTimeField()),
            )
        )


def schedules_sync_all() -> dict[str, list[str]]:
    """Give every provider without a schedule one (spread over its interval), and make sure
    beat's dispatcher entry exists. A few statements, however many providers."""
    report: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
    stateless = Provider.objects.filter(refresh_state__isnull=True).values_list("pk", flat=True)
    ProviderState.objects.bulk_create(
        [ProviderState(provider_id=pk) for pk in stateless],
        batch_size=500,
        ignore_conflicts=True,
    )
    now = timezone.now()
    unscheduled = list(
        ProviderState.objects.filter(next_run_at__isnull=True).select_related("provider")
    )
    for state in unscheduled:
        state.next_run_at = now + state.provider.refresh_interval * _phase(state.provider_id)
    ProviderState.objects.bulk_update(unscheduled, ["next_run_at"], batch_size=500)
    created = {state.provider.name for state in unscheduled}
    report["created"] = sorted(created)
    # In Python, not exclude(pk__in=…): SQLite refuses a statement with over 32,766 parameters.
    report["unchanged"] = sorted(set(Provider.objects.values_list("name", flat=True)) - created)
    if dispatcher_schedule_ensure():
        report["updated"].append(DISPATCH_SCHEDULE)
    return report


def schedule_dispatch(*, now: datetime | None = None) -> list[list[int]]:
    """Claim the enabled providers whose scheduled refresh is due and send them in batches.

    Each claimed provider's ``next_run_at`` moves one interval on (a run missed by more than an
    interval is dropped, not caught up). Two dispatchers never claim one provider: rows are
    locked (PostgreSQL: SKIP LOCKED) or the transaction holds SQLite's write lock. Returns the
    batches sent (ids), oldest due first.
    """
    now = now or timezone.now()
    limit = int(tokens_settings.DISPATCH_LIMIT)
    with transaction.atomic():
        due = list(
            ProviderState.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(next_run_at__lte=now, provider__enabled=True)
            .order_by("next_run_at", "provider_id")
            .values_list("provider_id", "next_run_at", "provider__refresh_interval")[:limit]
        )
        groups: dict[timedelta, list[tuple[int, datetime]]] = {}
        for provider_id, due_at, interval in due:
            assert due_at is not None  # filtered on next_run_at__lte
            groups.setdefault(interval, []).append((provider_id, due_at))
        batches: list[tuple[list[int], datetime, timedelta]] = []
        size = max(1, int(tokens_settings.DISPATCH_BATCH))
        for interval, members in groups.items():
            ids = [provider_id for provider_id, _ in members]
            for start in range(0, len(ids), 500):
                ProviderState.objects.filter(provider_id__in=ids[start : start + 500]).update(
                    next_run_at=Case(
                        When(
                            next_run_at__gt=now - interval,
                            then=ExpressionWrapper(
                                F("next_run_at") + interval, output_field=DateTimeField()
                            ),
                        ),
                        default=Value(now + interval, output_field=DateTimeField()),
                    )
                )
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                batches.append(([pid for pid, _ in chunk], chunk[0][1], interval))
        # Sent before the claim commits: a dispatch that cannot reach the broker claims nothing
        # (and a claim that fails to commit after the send only repeats refreshes, which skip).
        _send_batches(batches)
    metrics.SCHEDULE_DISPATCHED.inc(len(due))
    return [ids for ids, _, _ in batches]


def _send_batches(batches: list[tuple[list[int], datetime, timedelta]]) -> None:
    from tokens.tasks import enqueue_batch

    for ids, oldest_due, interval in batches:
        # A batch that waited a whole interval is dropped: the next run is already claimed.
        enqueue_batch(ids, due=oldest_due.timestamp(), expires=interval.total_seconds())


def refresh_batch(*, provider_ids: list[int], deadline: float) -> list[int]:
    """The scheduled refresh of each provider, until ``deadline`` (monotonic); returns the ids
    not begun by then, for another task. A failing provider never stops the others."""
    from tokens.tasks import enqueue_retry

    results = refresh_many(provider_ids, reason=Reason.SCHEDULE, deadline=deadline)
    for provider_id, result in results.items():
        if result.retry_in is not None:
            enqueue_retry(provider_id, result.retry_in)
    return [provider_id for provider_id in provider_ids if provider_id not in results]


# ---------------------------------------------------------------------------- keys


def encryption_keys_unreadable() -> list[str]:
    """The stored secrets and tokens that no key of TOKENS_ENCRYPTION_KEYS opens (described by
    provider name and token version, never by content)."""
    unreadable: list[str] = []
    secrets = (
        Provider.objects.exclude(secret="")
        .annotate(raw=Cast(F("secret"), output_field=TextField()))
        .values_list("name", "raw")
    )
    unreadable += [f"secret of {name}" for name, raw in secrets.iterator() if not crypto.opens(raw)]
    tokens = Token.objects.annotate(raw=Cast(F("value"), output_field=TextField())).values_list(
        "provider__name", "version", "raw"
    )
    unreadable += [
        f"token v{version} of {name}"
        for name, version, raw in tokens.iterator()
        if not crypto.opens(raw)
    ]
    return unreadable


def encryption_keys_rotate() -> int:
    """Re-encrypt every stored secret and token with the first key; returns rows rewritten.

    Refuses (KeyRotationRefused, nothing rewritten) when any row does not open with the keys:
    rotating would otherwise fail half-way, or tempt an operator to drop the key it needs.
    """
    unreadable = encryption_keys_unreadable()
    if unreadable:
        shown = ", ".join(unreadable[:10]) + (" …" if len(unreadable) > 10 else "")
        raise KeyRotationRefused(
            f"{len(unreadable)} stored value(s) do not open with TOKENS_ENCRYPTION_KEYS "
            f"({shown}): put back the key they were encrypted with (after the new one), then "
            "run this again"
        )
    rewritten = 0
    with transaction.atomic():
        for pk, secret in Provider.objects.values_list("pk", "secret"):
            Provider.objects.filter(pk=pk).update(secret=secret)
            rewritten += 1
        for pk, value in Token.objects.values_list("pk", "value"):
            Token.objects.filter(pk=pk).update(value=value)
            rewritten += 1
    return rewritten
