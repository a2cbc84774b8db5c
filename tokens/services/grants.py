"""Connected accounts: storing the first tokens of a grant a person just approved."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import datetime

from tokens import cache, locks, metrics
from tokens.cache import CachedToken
from tokens.exceptions import CacheUnavailable
from tokens.generators import GeneratedToken
from tokens.models import Provider, ProviderState, Token
from tokens.services.versions import fence_next, tokens_store_many

logger = logging.getLogger("tokens.refresh")


def grant_connect(*, provider: Provider, generated: GeneratedToken, attempted: datetime) -> Token:
    """Store a connected account's refresh token and first access token (one transaction, with
    the provider's next version: a refresh still in flight with an older refresh token can
    overwrite neither), then publish the access token to every process."""
    ProviderState.objects.ensure([provider.pk])
    fence = fence_next(provider_id=provider.pk)
    (token,) = tokens_store_many(items=[(provider, fence, generated, attempted)])
    assert token is not None  # the newest version always wins
    with contextlib.suppress(CacheUnavailable):  # the database has it; readers fall back to it
        cache.entries_put(
            [(provider.name, CachedToken.from_row(token))], now=time.time(), publish=True
        )
        # Readers held back by the failures of the grant before may ask for refreshes again.
        locks.pending_clear(provider.pk)
    metrics.REFRESHES.labels(provider.name, "connected").inc()
    logger.info(
        "account connected provider=%s version=%s fingerprint=%s",
        provider.name,
        token.version,
        token.fingerprint,
    )
    return token
