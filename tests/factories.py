from __future__ import annotations

from datetime import timedelta
from typing import Any

from tokens.models import Provider, ProviderState

SECRET = "s3cr3t-client-secret-VALUE-9f8e7d"


def oauth2_config(url: str, **extra: Any) -> dict[str, Any]:
    return {"token_url": url, "client_id": "client-1", **extra}


def make_provider(
    name: str = "api",
    *,
    kind: str = "oauth2_client_credentials",
    config: dict[str, Any] | None = None,
    secret: str = SECRET,
    interval: float = 300,
    enabled: bool = True,
) -> Provider:
    """Create a provider the way a user would in code (signals schedule and refresh it)."""
    return Provider.objects.create(
        name=name,
        kind=kind,
        config=config if config is not None else {},
        secret=secret,
        refresh_interval=timedelta(seconds=interval),
        enabled=enabled,
    )


def counted_provider(name: str = "api", **kwargs: Any) -> Provider:
    """A provider whose tokens are numbered by a Redis counter (tests.callables.counted)."""
    return make_provider(
        name, kind="callable", config={"path": "tests.callables.counted"}, **kwargs
    )


def state(provider: Provider) -> ProviderState:
    return ProviderState.objects.get(provider=provider)
