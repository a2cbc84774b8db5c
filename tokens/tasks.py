from __future__ import annotations

import time
from typing import Any

from celery import Task, shared_task

from tokens import metrics, services
from tokens.conf import tokens_settings
from tokens.exceptions import TIME_LIMITS
from tokens.services import Reason

# Why a refresh runs travels in a message header, so the task's arguments (what Flower and the
# task events show) are only provider ids. Scheduled batches carry none: "schedule".
REASON_HEADER = "tokens_reason"
# When the oldest provider of a scheduled batch fell due (Unix time), for the lateness metric.
DUE_HEADER = "tokens_due"


@shared_task(name=services.REFRESH_TASK, ignore_result=True, bind=True)
def refresh_token(self: Task, provider_id: int) -> None:
    """Refresh one provider's token; after a transient failure, try again after the backoff."""
    reason = Reason(self.request.get(REASON_HEADER) or Reason.SCHEDULE)
    try:
        result = services.token_refresh(provider_id=provider_id, reason=reason)
    except TIME_LIMITS:
        raise  # recorded as a failure that waits; readers are held off meanwhile
    except Exception:
        # Readers waiting on this refresh must be free to ask again (say the database was
        # briefly unreachable), not wait out the pending claim.
        services.release_pending(provider_id=provider_id)
        raise
    if result.retry_in is not None:
        enqueue_retry(provider_id, result.retry_in)


@shared_task(name=services.DISPATCH_TASK, ignore_result=True)
def dispatch_due() -> None:
    """Beat's one entry: send the scheduled refreshes that are due, in batches."""
    services.schedule_dispatch()


@shared_task(name=services.BATCH_TASK, ignore_result=True, bind=True)
def refresh_batch(self: Task, provider_ids: list[int]) -> None:
    """The scheduled refresh of each provider in turn. What is left when the batch's time
    budget runs out (slow endpoints) goes on in a new task, well inside the time limits."""
    deadline = time.monotonic() + tokens_settings.seconds("BATCH_BUDGET")
    header = self.request.get(DUE_HEADER)
    due = float(header) if header is not None else None
    if due is not None:
        metrics.SCHEDULE_LATENESS.observe(max(0.0, time.time() - due))
    left: list[int] = []
    try:
        left = services.refresh_batch(provider_ids=provider_ids, deadline=deadline)
    except TIME_LIMITS:
        # Those stored already are fresh now and will be skipped; those stopped mid-call keep
        # their lock until it expires (so none is retried at once).
        left = list(provider_ids)
        raise
    except Exception:
        for provider_id in provider_ids:
            services.release_pending(provider_id=provider_id)
        raise
    finally:
        if left:
            enqueue_batch(left, due=due)


def lane(reason: Reason, *, failing: bool = False) -> dict[str, str]:
    """The queue of a refresh sent for ``reason``: somebody waits for MANUAL and READER ones
    (the urgent queue), unless the provider is failing (its endpoint may hang: it must not hold
    up the others); the schedule's and retries go where slow endpoints may queue up."""
    urgent = reason in (Reason.MANUAL, Reason.READER) and not failing
    queue = tokens_settings.QUEUE_URGENT if urgent else tokens_settings.QUEUE_SCHEDULED
    return {"queue": queue} if queue else {}


def enqueue(provider_id: int, reason: Reason, *, failing: bool = False, **options: Any) -> None:
    """Send a refresh of ``provider_id`` for ``reason`` (options go to apply_async)."""
    refresh_token.apply_async(
        args=(provider_id,),
        headers={REASON_HEADER: str(reason)},
        **{**lane(reason, failing=failing), **options},
    )


def enqueue_retry(provider_id: int, retry_in: float) -> None:
    """Try ``provider_id`` again once its backoff (``retry_in`` seconds) is over."""
    enqueue(provider_id, Reason.RETRY, countdown=retry_in, expires=retry_in + 60)


def enqueue_batch(provider_ids: list[int], *, due: float | None, **options: Any) -> None:
    headers = {DUE_HEADER: repr(float(due))} if due is not None else {}
    refresh_batch.apply_async(
        args=(list(provider_ids),), headers=headers, **{**lane(Reason.SCHEDULE), **options}
    )
