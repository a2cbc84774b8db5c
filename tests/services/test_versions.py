"""Versions: a late, older writer never wins, in the database or in the cache."""

from __future__ import annotations

import pytest
from django.utils import timezone

from tests.factories import counted_provider, state
from tokens import cache
from tokens.generators import GeneratedToken
from tokens.models import Token
from tokens.services import refresh, versions

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def test_refresh__stale_fence_never_replaces_a_newer_token() -> None:
    """A refresh holding an older version that stores late is discarded, in DB and cache."""
    provider = counted_provider()
    stale_fence = versions.fence_next(provider_id=provider.pk)  # a slow refresh got this...
    refresh.token_refresh(provider_id=provider.pk)  # ...then a newer refresh stored
    newer = state(provider).current_version
    assert newer > stale_fence

    late = (provider, stale_fence, GeneratedToken(access_token="stale-token"), timezone.now())
    assert versions.tokens_store_many(items=[late]) == [None]
    assert state(provider).current_version == newer
    assert not Token.objects.filter(version=stale_fence).exists()
    assert cache.entry_get("api").version == newer and cache.entry_get("api").value == "api-token-1"
