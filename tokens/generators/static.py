"""A fixed token: the provider's secret. It never expires."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokens.generators.base import GeneratedToken, Generator

if TYPE_CHECKING:
    from tokens.models import Provider


class StaticGenerator(Generator):
    kind = "static"
    label = "Static token"
    secret_required = True
    help_text = "No config keys. The provider's secret is the token; it does not expire."

    def generate(self, provider: Provider) -> GeneratedToken:
        return GeneratedToken(access_token=provider.secret, token_type="Bearer", expires_at=None)
