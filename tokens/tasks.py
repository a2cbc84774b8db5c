from __future__ import annotations

from celery import shared_task

from tokens import services
from tokens.services import Reason


@shared_task(name="tokens.refresh_token", ignore_result=True)
def refresh_token(provider_id: int, reason: str = Reason.SCHEDULE) -> None:
    """Refresh one provider's token; after a transient failure, try again after the backoff."""
    result = services.token_refresh(provider_id=provider_id, reason=Reason(reason))
    if result.retry_in is not None:
        refresh_token.apply_async(
            args=(provider_id, str(Reason.RETRY)),
            countdown=result.retry_in,
            expires=result.retry_in + 60,
        )
