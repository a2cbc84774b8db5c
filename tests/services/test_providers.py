"""What saving a provider means: its old tokens are void, its failures forgotten."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.factories import counted_provider, make_provider, state
from tokens import cache
from tokens.constants import Outcome
from tokens.generators import GeneratedToken
from tokens.models import Provider
from tokens.services import refresh, versions

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def test_config_change_voids_the_old_token_and_fences_inflight_refreshes() -> None:
    provider = counted_provider()
    refresh.token_refresh(provider_id=provider.pk)
    inflight = versions.fence_next(provider_id=provider.pk)  # minted with the old config
    provider.config = {"path": "tests.callables.mapping"}
    provider.save()
    assert cache.entry_get("api") is None
    from tokens.selectors import current_token

    assert current_token(provider=provider) is None
    late = (provider, inflight, GeneratedToken(access_token="old-config"), timezone.now())
    assert versions.tokens_store_many(items=[late]) == [None]
    assert cache.entry_get("api") is None
    assert refresh.token_refresh(provider_id=provider.pk).outcome == Outcome.STORED
    assert current_token(provider=provider).value == "mapped"


def test_config_change_resets_failures() -> None:
    provider = make_provider(config={"client_id": "c"})
    refresh.token_refresh(provider_id=provider.pk)
    assert state(provider).consecutive_failures == 1
    provider.config = {"path": "tests.callables.mapping"}
    provider.kind = "callable"
    provider.save()
    assert state(provider).consecutive_failures == 0 and state(provider).last_error == ""


def test_saving_a_stale_instance_never_moves_the_fence_back() -> None:
    provider = counted_provider()
    copy = Provider.objects.get(pk=provider.pk)
    refresh.token_refresh(provider_id=provider.pk)
    version = state(provider).current_version
    copy.refresh_interval = timedelta(seconds=60)
    copy.save()
    assert state(provider).current_version == version
    assert cache.entry_get("api").version == version
