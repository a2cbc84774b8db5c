"""A fixed token: the provider's secret. It never expires."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tokens.generators.base import (
    MAX_TOKEN_LENGTH,
    TOKEN_SYNTAX,
    ConfigErrors,
    GeneratedToken,
    Generator,
)

if TYPE_CHECKING:
    from tokens.models import Provider


class StaticGenerator(Generator):
    kind = "static"
    label = "Static token"
    secret_required = True
    scheduled = False
    help_text = "No config keys. The provider's secret is the token; it does not expire."

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        if secret and (len(secret) > MAX_TOKEN_LENGTH or not TOKEN_SYNTAX.fullmatch(secret)):
            errors.add(
                "secret",
                "a token is visible ASCII without spaces, line breaks or control characters "
                f"(at most {MAX_TOKEN_LENGTH} characters)",
            )

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        return self.kind  # the token goes wherever the application sends it, config or not

    def generate(self, provider: Provider) -> GeneratedToken:
        return GeneratedToken(access_token=provider.secret, token_type="Bearer", expires_at=None)
