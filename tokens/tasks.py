from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from tokens import services
from tokens.services import Reason

# Why a refresh runs travels in a message header, so the task's arguments (what Flower and the
# task events show) are only the provider's id. Beat's messages carry none: "schedule".
REASON_HEADER = "tokens_reason"


@shared_task(name=services.REFRESH_TASK, ignore_result=True, bind=True)
def refresh_token(self: Task, provider_id: int) -> None:
    """Refresh one provider's token; after a transient failure, try again after the backoff."""
    reason = Reason(self.request.get(REASON_HEADER) or Reason.SCHEDULE)
    try:
        result = services.token_refresh(provider_id=provider_id, reason=reason)
    except Exception:
        # Readers waiting on this refresh must be free to ask again (say the database was
        # briefly unreachable), not wait out the pending claim.
        services.release_pending(provider_id=provider_id)
        raise
    if result.retry_in is not None:
        enqueue(provider_id, Reason.RETRY, countdown=result.retry_in, expires=result.retry_in + 60)


def enqueue(provider_id: int, reason: Reason, **options: Any) -> None:
    """Send a refresh of ``provider_id`` for ``reason`` (options go to apply_async)."""
    refresh_token.apply_async(args=(provider_id,), headers={REASON_HEADER: str(reason)}, **options)
