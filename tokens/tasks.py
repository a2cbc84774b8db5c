"""Celery tasks: each reads its message, calls one service, and owns the retries and re-sends."""

from __future__ import annotations

import re
import time
from typing import Any

from celery import Task, shared_task

from tokens import locks, metrics, queue, selectors
from tokens.conf import tokens_settings
from tokens.constants import (
    AFTER_ERROR_HEADER,
    BATCH_TASK,
    DISPATCH_TASK,
    DUE_HEADER,
    REASON_HEADER,
    REFRESH_TASK,
    Outcome,
    Reason,
)
from tokens.exceptions import TIME_LIMITS, RefreshFailed
from tokens.services import refresh, schedule
from tokens.services.results import RefreshResult

# What a failed task's message may hold, at most (a batch names each failed provider).
FAILURE_TEXT_LIMIT = 2000
MARKUP = re.compile(r"[<>&\"'`]")


def _failed(results: dict[int, RefreshResult]) -> None:
    """End the task failed when a refresh failed (Flower's Failed state), naming each."""
    failures = {
        pid: r.error or "failed" for pid, r in results.items() if r.outcome == Outcome.FAILED
    }
    if not failures:
        return
    names = selectors.provider_names(provider_ids=list(failures))
    text = "; ".join(f"{names.get(pid, pid)}: {error}" for pid, error in failures.items())
    if len(results) > 1:
        text = f"{len(failures)} of {len(results)} failed: {text}"
    # No markup characters: an issuer's words must not become HTML in a page that shows them.
    raise RefreshFailed(MARKUP.sub(" ", text[:FAILURE_TEXT_LIMIT]))


@shared_task(name=REFRESH_TASK, ignore_result=True, bind=True, throws=(RefreshFailed,))
def refresh_token(self: Task, provider_id: int) -> None:
    """Refresh one provider's token; after a transient failure, try again after the backoff."""
    reason = Reason(self.request.get(REASON_HEADER) or Reason.SCHEDULE)
    try:
        result = refresh.token_refresh(provider_id=provider_id, reason=reason)
    except TIME_LIMITS:
        raise  # recorded as a failure that waits; readers are held off meanwhile
    except Exception:
        # Readers waiting on this refresh must be free to ask again (say the database was
        # briefly unreachable), not wait out the pending claim.
        locks.pending_clear(provider_id)
        raise
    if result.retry_in is not None:
        queue.retry_send(provider_id=provider_id, retry_in=result.retry_in)
    _failed({provider_id: result})


@shared_task(name=DISPATCH_TASK, ignore_result=True)
def dispatch_due() -> None:
    """Beat's one entry: send the scheduled refreshes that are due, in batches."""
    schedule.due_dispatch()


@shared_task(name=BATCH_TASK, ignore_result=True, bind=True, throws=(RefreshFailed,))
def refresh_batch(self: Task, provider_ids: list[int]) -> None:
    """The scheduled refresh of each provider (a failing one never stops the others), or,
    with no ids (the dispatcher's help for busy batches), of those due now; and of those that
    fall due while its requests are in flight (TOKENS_BATCH_PULL_EVERY). What is not begun
    when the batch's time budget runs out (slow endpoints) goes on in a new task, well inside
    the time limits; failures are tried again after their backoff. After an unexpected error
    (the database unreachable), what it had claimed goes on once, after TOKENS_LOCK_TTL."""
    deadline = time.monotonic() + tokens_settings.seconds("BATCH_BUDGET")
    header = self.request.get(DUE_HEADER)
    due = float(header) if header is not None else None
    if due is not None:
        metrics.SCHEDULE_LATENESS.observe(max(0.0, time.time() - due))
    taken = list(dict.fromkeys(provider_ids))  # and those claimed from the schedule meanwhile
    mine = set(taken)
    # Claimed again while this batch has them (due again during their call: a short interval,
    # or made due by a refresh that found this batch's lock): never begun twice at once, but
    # handed on, to run once this batch has let their locks go.
    again: list[int] = []

    def pull(room: int) -> list[int]:
        ids = schedule.due_take(limit=room)
        again.extend(pid for pid in ids if pid in mine)
        new = [pid for pid in ids if pid not in mine]
        taken.extend(new)
        mine.update(new)
        return new

    pulling = tokens_settings.seconds("BATCH_PULL_EVERY") > 0
    left: list[int] = []
    after_error = False
    results: dict[int, RefreshResult] = {}
    try:
        if not provider_ids and pulling:
            provider_ids = pull(int(tokens_settings.HTTP_CONCURRENCY))  # the dispatcher's help
        results = refresh.refresh_many(
            provider_ids=provider_ids, reason=Reason.SCHEDULE, deadline=deadline, pull=pull
        )
        for provider_id, result in results.items():
            if result.retry_in is not None:
                queue.retry_send(provider_id=provider_id, retry_in=result.retry_in)
        left = [provider_id for provider_id in taken if provider_id not in results] + again
    except TIME_LIMITS:
        # Those stored already are fresh now and will be skipped; those stopped mid-call keep
        # their lock until it expires (so none is retried at once).
        left = taken + again
        raise
    except Exception:
        for provider_id in taken:
            locks.pending_clear(provider_id)
        # Claimed, so moved one interval on: handed on rather than dropped, once, after the
        # locks of calls the error left running have expired (those stored are skipped then).
        if not self.request.get(AFTER_ERROR_HEADER):
            left, after_error = taken + again, True
        raise
    finally:
        if pulling:
            locks.schedule_taken_end()
        if left:
            options: dict[str, Any] = (
                {"countdown": tokens_settings.seconds("LOCK_TTL")} if after_error else {}
            )
            queue.batch_send(
                provider_ids=list(dict.fromkeys(left)), due=due, after_error=after_error, **options
            )
    _failed(results)
