"""The generator registry: built-in kinds plus the project's TOKENS_GENERATORS."""

from __future__ import annotations

import functools

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from tokens.conf import tokens_settings
from tokens.generators.base import GeneratedToken, Generator

BUILTIN: dict[str, str] = {
    "oauth2_client_credentials": "tokens.generators.oauth2.OAuth2ClientCredentials",
    "oauth2_refresh_token": "tokens.generators.connected.OAuth2RefreshToken",
    "jwt_bearer": "tokens.generators.jwt_bearer.JwtBearer",
    "github_app": "tokens.generators.github_app.GitHubApp",
    "callable": "tokens.generators.callable.CallableGenerator",
    "static": "tokens.generators.static.StaticGenerator",
}

__all__ = ["BUILTIN", "GeneratedToken", "Generator", "get_generator", "kind_choices", "registry"]


@functools.lru_cache(maxsize=8)
def _load(paths: tuple[tuple[str, str], ...]) -> dict[str, Generator]:
    generators: dict[str, Generator] = {}
    for kind, path in paths:
        try:
            cls = import_string(path)
        except ImportError as error:
            raise ImproperlyConfigured(f"TOKENS_GENERATORS[{kind!r}]: {error}") from error
        if not (isinstance(cls, type) and issubclass(cls, Generator)):
            raise ImproperlyConfigured(f"TOKENS_GENERATORS[{kind!r}]: {path} is not a Generator")
        generators[kind] = cls()
    return generators


def registry() -> dict[str, Generator]:
    """Every generator kind, by name."""
    return _load(tuple({**BUILTIN, **tokens_settings.GENERATORS}.items()))


def get_generator(kind: str) -> Generator:
    try:
        return registry()[kind]
    except KeyError:
        raise LookupError(f"unknown generator kind {kind!r}") from None


def kind_choices() -> list[tuple[str, str]]:
    return [(kind, generator.label) for kind, generator in registry().items()]
