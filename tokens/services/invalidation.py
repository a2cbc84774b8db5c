"""Voiding tokens: when a provider's config changes or it is disabled, when an API rejects its
token, and when it is deleted or renamed."""

from __future__ import annotations

import hmac
import logging
import math
import time

from django.db import transaction

from tokens import cache, locks, memory, queue, selectors
from tokens.conf import tokens_settings
from tokens.constants import Reason
from tokens.exceptions import CacheUnavailable
from tokens.models import Provider, ProviderState
from tokens.services.versions import fence_next

logger = logging.getLogger("tokens")


def provider_invalidate(
    *,
    provider: Provider,
    reset_failures: bool = False,
    expected_version: int | None = None,
    new_refresh_token: bool = False,
) -> int | None:
    """Void every token of ``provider`` issued so far (config changed, disabled, rejected).

    Moves the fence on, so a refresh already in flight cannot store its (old) token, drops the
    cached entry and tells every process. With ``expected_version``, only if that version is
    still the current one (a stale rejection must not void a newer token). Returns the new
    version floor, or None when nothing was voided. ``new_refresh_token``: a person stored a
    new refresh token; a refresh in flight with the old one cannot overwrite it.
    """
    ProviderState.objects.ensure([provider.pk])
    with transaction.atomic():
        fence = fence_next(provider_id=provider.pk)
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
                reconnect_needed=False,
            )
        if new_refresh_token:
            changes["refresh_token_version"] = fence
        states = ProviderState.objects.filter(provider_id=provider.pk)
        if expected_version is not None:
            states = states.filter(current_version=expected_version)
        if not states.update(**changes):
            return None
    cache.entry_void(provider.name, fence)
    return fence


def provider_forget(*, name: str) -> None:
    """Drop the cached token of a name no provider has any more, and tell every process."""
    cache.name_forget(name)


def token_reject(*, name: str, token: str) -> bool:
    """An API rejected ``token`` of the provider ``name`` (say, with a 401).

    If it is still the current token, and the provider's token was not voided in the last
    TOKENS_INVALIDATE_COOLDOWN (an API that rejects every token must not turn each of its 401s
    into a token-endpoint call), it is voided everywhere and a refresh is sent: True. A token
    that is no longer current (a stale rejection) changes nothing: False.
    """
    provider = selectors.provider_for_reading(name=name)
    current = selectors.current_token(provider=provider)
    if current is None or not hmac.compare_digest(current.value.encode(), token.encode()):
        return False
    if not _invalidation_allowed(provider.pk):
        logger.info("tokens: invalidation of %s within its cool-down, ignored", provider.name)
        return False
    if provider_invalidate(provider=provider, expected_version=current.version) is None:
        return False  # a newer token arrived meanwhile
    memory.entry_drop(name, up_to_version=current.version)
    failing = selectors.provider_is_failing(provider_id=provider.pk)
    queue.refresh_send(
        provider_id=provider.pk, reason=Reason.MANUAL, failing=failing, name=provider.name
    )
    return True


_local_invalidations: dict[int, float] = {}


def _invalidation_allowed(provider_id: int) -> bool:
    """At most one invalidation per provider per TOKENS_INVALIDATE_COOLDOWN, fleet-wide (a Redis
    claim) or, while Redis is unreachable, per process."""
    cooldown = tokens_settings.seconds("INVALIDATE_COOLDOWN")
    if cooldown <= 0:
        return True
    try:
        return locks.claim("inval", provider_id, cooldown)
    except CacheUnavailable:
        now = time.monotonic()
        if now - _local_invalidations.get(provider_id, -math.inf) < cooldown:
            return False
        _local_invalidations[provider_id] = now
        return True
