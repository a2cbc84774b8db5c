"""tokens: access tokens for outbound API calls, refreshed by Celery beat.

from tokens import get_token
headers = {"Authorization": f"Bearer {get_token('payments')}"}
"""

from typing import TYPE_CHECKING, Any

from tokens.exceptions import (
    GeneratorError,
    ProviderDisabled,
    TokenError,
    TokenUnavailable,
    UnknownProvider,
)

if TYPE_CHECKING:
    from tokens.api import aget_token, ainvalidate_token, get_token, invalidate_token

_API = ("get_token", "aget_token", "invalidate_token", "ainvalidate_token")

__all__ = [
    "GeneratorError",
    "ProviderDisabled",
    "TokenError",
    "TokenUnavailable",
    "UnknownProvider",
    "aget_token",
    "ainvalidate_token",
    "get_token",
    "invalidate_token",
]


def __getattr__(name: str) -> Any:
    # The API needs the app registry (models): import it on first use, not with the package.
    if name in _API:
        from tokens import api

        return getattr(api, name)
    raise AttributeError(f"module 'tokens' has no attribute {name!r}")
