"""A failed refresh: what is recorded, what is logged, and when to try again.

The issuer's words may echo the secret in any encoding: they are scrubbed with the provider's
secret and every token it still has, or withheld whole, before anything is cut, stored or
logged. Only the newest refresh reports (a config change or a newer refresh moved the fence on).
"""

from __future__ import annotations

import contextlib
import logging
import random
from datetime import datetime, timedelta

from django.db.models import F
from django.utils import timezone

from tokens import cache, locks, metrics, selectors
from tokens.conf import tokens_settings
from tokens.constants import Outcome
from tokens.exceptions import CacheUnavailable, GeneratorError
from tokens.generators import registry
from tokens.models import Provider, ProviderState
from tokens.sanitize import WITHHELD, echoes, scrub
from tokens.services.results import RefreshResult
from tokens.status import has_valid_token

logger = logging.getLogger("tokens.refresh")


def retry_delay(*, failures: int, retry_after: float | None = None, wanted: bool = False) -> float:
    """Exponential backoff with full jitter in its upper half, capped by TOKENS_RETRY_MAX; or,
    while readers want a token that no longer exists (``wanted``), by TOKENS_RETRY_MAX_WANTED
    and never under a second (recovery within seconds of the endpoint healing, at most one
    request a second). ``Retry-After`` is honoured up to the cap."""
    cap = tokens_settings.seconds("RETRY_MAX_WANTED" if wanted else "RETRY_MAX")
    base = tokens_settings.seconds("RETRY_BASE")
    delay = min(cap, base * 2 ** max(0, failures - 1)) * random.uniform(0.5, 1.0)  # noqa: S311
    if wanted:
        delay = max(delay, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, tokens_settings.seconds("RETRY_MAX")))
    return delay


def failure_record(
    *,
    provider: Provider,
    fence: int,
    error: GeneratorError,
    duration: float,
    attempted: datetime,
) -> RefreshResult:
    """Record a failed refresh (sanitized), count and log it; when to try again."""
    now = timezone.now()
    state = provider.state_or_none
    metrics.REFRESH_DURATION.labels(provider.kind).observe(duration)
    metrics.REFRESHES.labels(provider.name, "failed").inc()
    metrics.REFRESH_FAILURES.labels(provider.name, error.kind).inc()
    secrets = [
        *_credentials(provider),
        error.refresh_token or "",
        *error.sent,
        *selectors.provider_token_values(provider=provider),
    ]
    detail = error.detail
    if detail and echoes(detail, secrets):
        detail = WITHHELD
    label = "reconnect needed" if error.reconnect else error.kind
    message = scrub(f"{label}: {error}" + (f": {detail}" if detail else ""), secrets)
    failures = (state.consecutive_failures if state else 0) + 1
    if error.transient and error.retry_after:
        # The issuer said when to come back: readers wanting a token do not bring it closer.
        with contextlib.suppress(CacheUnavailable):
            locks.claim(
                "soon", provider.pk, min(error.retry_after, tokens_settings.seconds("RETRY_MAX"))
            )
    if error.transient:
        wanted = not has_valid_token(state, now)
        retry_in: float | None = retry_delay(
            failures=failures, retry_after=error.retry_after, wanted=wanted
        )
        next_attempt = now + timedelta(seconds=retry_in or 0)
    else:
        # Permanent: no retries; the next scheduled run (or a config change) tries again.
        retry_in = None
        next_attempt = None
    ProviderState.objects.filter(provider_id=provider.pk, fence=fence).update(
        consecutive_failures=F("consecutive_failures") + 1,
        last_error=message,
        last_error_at=now,
        last_attempt_at=attempted,
        next_attempt_at=next_attempt,
        permanent_error=not error.transient,
        reconnect_needed=error.reconnect,
    )
    cache.failure_notify(provider.name)
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


def _credentials(provider: Provider) -> list[str]:
    """The provider's secret (in every form its kind knows) and refresh token."""
    generator = registry().get(provider.kind)
    secrets = generator.secrets(provider) if generator is not None else [provider.secret]
    return [*secrets, provider.refresh_token]
