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
    from tokens.api import get_token

__all__ = [
    "GeneratorError",
    "ProviderDisabled",
    "TokenError",
    "TokenUnavailable",
    "UnknownProvider",
    "get_token",
]


def __getattr__(name: str) -> Any:
    # get_token needs the app registry (models); import it on first use, not with the package.
    if name == "get_token":
        from tokens.api import get_token

        return get_token
    raise AttributeError(f"module 'tokens' has no attribute {name!r}")
