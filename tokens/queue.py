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
from tokens.constants import (
    AFTER_ERROR_HEADER,
    BATCH_TASK,
    DUE_HEADER,
    REASON_HEADER,
    REFRESH_TASK,
    Reason,
)
from tokens.models import Provider


def lane(reason: Reason, *, failing: bool = False) -> dict[str, str]:
    """The queue option of a refresh sent for ``reason`` ({} for Celery's default routing)."""
    urgent = reason in (Reason.MANUAL, Reason.READER) and not failing
    queue = tokens_settings.QUEUE_URGENT if urgent else tokens_settings.QUEUE_SCHEDULED
    return {"queue": queue} if queue else {}


def message_ttl() -> float:
    """How long a refresh somebody asked for stays worth running (TOKENS_PENDING_TTL)."""
    return max(tokens_settings.seconds("PENDING_TTL"), 1.0)


def shown(
    provider_ids: list[int], names: list[str] | None = None, *, batch: bool = False
) -> dict[str, str]:
    """What Flower and the task events show of a refresh's arguments: its real arguments (the
    ids), and the providers' names (``kwargsrepr``; the task takes ids only), so that a search
    for a name finds every refresh of it, single or batched. Names are looked up when not
    given."""
    if names is None:
        found = dict(Provider.objects.filter(pk__in=provider_ids).values_list("pk", "name"))
        names = [found.get(pid, "?") for pid in provider_ids]
    if batch:
        return {
            "argsrepr": repr((list(provider_ids),)),
            "kwargsrepr": repr({"providers": list(names)}),
        }
    return {"argsrepr": repr((provider_ids[0],)), "kwargsrepr": repr({"provider": names[0]})}


def refresh_send(
    *,
    provider_id: int,
    reason: Reason,
    failing: bool = False,
    after_commit: bool = True,
    name: str | None = None,
    **options: Any,
) -> None:
    """Send a refresh of ``provider_id`` (called ``name``) for ``reason``, once the current
    transaction commits (``after_commit``: at once outside one) or now. ``options`` go to
    Celery's send_task."""

    def send() -> None:
        current_app.send_task(
            REFRESH_TASK,
            args=(provider_id,),
            headers={REASON_HEADER: str(reason)},
            **{
                "expires": message_ttl(),
                **lane(reason, failing=failing),
                **shown([provider_id], None if name is None else [name]),
                **options,
            },
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


def batch_send(
    *,
    provider_ids: list[int],
    due: float | None,
    names: list[str] | None = None,
    after_error: bool = False,
    **options: Any,
) -> None:
    """Send the scheduled refresh of ``provider_ids`` (one task; ``names`` theirs, in order);
    ``due``: when the oldest fell due (Unix time), for the lateness metric; ``after_error``:
    handed on by a batch that an unexpected error stopped."""
    headers = {DUE_HEADER: repr(float(due))} if due is not None else {}
    if after_error:
        headers[AFTER_ERROR_HEADER] = "1"
    current_app.send_task(
        BATCH_TASK,
        args=(list(provider_ids),),
        headers=headers,
        **{**lane(Reason.SCHEDULE), **shown(list(provider_ids), names, batch=True), **options},
    )
