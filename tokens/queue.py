"""The only module that talks to the broker: refreshes, retries and batches are sent by task
name, on the lane their reason calls for.

Two lanes (Celery queues): TOKENS_QUEUE_URGENT carries the refreshes somebody waits for (a
reader, an operator, a new or changed provider) and beat's dispatcher; TOKENS_QUEUE_SCHEDULED
carries scheduled batches and retries, where slow endpoints may queue up. A refresh somebody
waits for of a failing provider goes to the scheduled lane too: its endpoint may hang.
"""

from __future__ import annotations

from typing import Any

from celery import current_app
from django.db import transaction

from tokens.conf import tokens_settings
from tokens.constants import BATCH_TASK, DUE_HEADER, REASON_HEADER, REFRESH_TASK, Reason


def lane(reason: Reason, *, failing: bool = False) -> dict[str, str]:
    """The queue option of a refresh sent for ``reason`` ({} for Celery's default routing)."""
    urgent = reason in (Reason.MANUAL, Reason.READER) and not failing
    queue = tokens_settings.QUEUE_URGENT if urgent else tokens_settings.QUEUE_SCHEDULED
    return {"queue": queue} if queue else {}


def message_ttl() -> float:
    """How long a refresh somebody asked for stays worth running (TOKENS_PENDING_TTL)."""
    return max(tokens_settings.seconds("PENDING_TTL"), 1.0)


def refresh_send(
    *,
    provider_id: int,
    reason: Reason,
    failing: bool = False,
    after_commit: bool = True,
    **options: Any,
) -> None:
    """Send a refresh of ``provider_id`` for ``reason``, once the current transaction commits
    (``after_commit``: at once outside one) or now. ``options`` go to Celery's send_task."""

    def send() -> None:
        current_app.send_task(
            REFRESH_TASK,
            args=(provider_id,),
            headers={REASON_HEADER: str(reason)},
            **{"expires": message_ttl(), **lane(reason, failing=failing), **options},
        )

    if after_commit:
        transaction.on_commit(send)
    else:
        send()


def retry_send(*, provider_id: int, retry_in: float) -> None:
    """Try ``provider_id`` again once its backoff (``retry_in`` seconds) is over."""
    refresh_send(
        provider_id=provider_id,
        reason=Reason.RETRY,
        after_commit=False,
        countdown=retry_in,
        expires=retry_in + 60,
    )


def batch_send(*, provider_ids: list[int], due: float | None, **options: Any) -> None:
    """Send the scheduled refresh of ``provider_ids`` (one task); ``due``: when the oldest fell
    due (Unix time), for the lateness metric."""
    headers = {DUE_HEADER: repr(float(due))} if due is not None else {}
    current_app.send_task(
        BATCH_TASK,
        args=(list(provider_ids),),
        headers=headers,
        **{**lane(Reason.SCHEDULE), **options},
    )
