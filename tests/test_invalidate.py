"""invalidate_token(): a 401 from an API drops the token everywhere, but only if still current."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from tests.factories import make_provider
from tests.processes import broker_count, purge_queues, wait_for
from tokens import ainvalidate_token, cache, get_token, invalidate_token, memory
from tokens.constants import Reason
from tokens.models import Provider
from tokens.services.refresh import token_refresh

pytestmark = pytest.mark.django_db(transaction=True)


def refreshed(name: str = "api") -> Provider:
    provider = make_provider(name, kind="callable", config={"path": "tests.callables.counted"})
    token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    return provider


def test_invalidate__current_token_is_dropped_everywhere_and_a_refresh_is_queued() -> None:
    provider = refreshed()
    assert get_token("api") == "api-token-1"
    purge_queues()
    assert invalidate_token("api", "api-token-1") is True
    assert "api" not in memory.memory
    assert cache.entry_get("api") is None
    assert broker_count("tokens.urgent") == 1  # the refresh

    def refresh_soon() -> None:
        time.sleep(0.3)
        try:
            token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
        finally:
            connection.close()  # a thread's own connection

    thread = threading.Thread(target=refresh_soon)
    thread.start()
    assert get_token("api", timeout=10) == "api-token-2"  # waited for the new one
    thread.join()


def test_invalidate__a_stale_token_changes_nothing() -> None:
    provider = refreshed()
    token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)  # api-token-2 is current now
    assert invalidate_token("api", "api-token-1") is False
    assert invalidate_token("api", "never-issued") is False
    assert get_token("api") == "api-token-2"
    assert cache.entry_get("api").value == "api-token-2"


def test_invalidate__other_processes_drop_it_too() -> None:
    from tests.processes import run_script

    refreshed()
    result = run_script(
        "from tokens import invalidate_token; print(invalidate_token('api', 'api-token-1'))"
    )
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]
    wait_for(
        lambda: "api" not in memory.memory and cache.entry_get("api") is None,
        5,
        message="this process to hear of it",
    )


def test_invalidate__bad_arguments_and_unknown_provider() -> None:
    from tokens import UnknownProvider

    with pytest.raises(TypeError):
        invalidate_token("api", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        invalidate_token("", "x")
    with pytest.raises(UnknownProvider):
        invalidate_token("nope", "x")


def test_ainvalidate__async_twin() -> None:
    import asyncio

    refreshed()

    async def twice() -> tuple[bool, bool]:
        return await ainvalidate_token("api", "api-token-1"), await ainvalidate_token(
            "api", "api-token-1"
        )

    assert asyncio.run(twice()) == (True, False)
