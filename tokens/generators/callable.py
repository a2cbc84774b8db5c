"""A token made by a function of the project's: config ``path`` is its dotted path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from tokens.exceptions import GeneratorError
from tokens.generators.base import (
    ConfigErrors,
    GeneratedToken,
    Generator,
    token_from_mapping,
)

if TYPE_CHECKING:
    from tokens.models import Provider


def load(path: str) -> Callable[..., Any]:
    function = import_string(path)
    if not callable(function):
        raise TypeError(f"{path} is not callable")
    return function


class CallableGenerator(Generator):
    kind = "callable"
    label = "Python callable"
    required_keys = frozenset({"path"})
    help_text = (
        "Key: path, the dotted path of a function taking the provider and returning a string, "
        "a mapping with access_token and optional expires_in / expires_at / token_type, "
        "or a tokens.generators.base.GeneratedToken."
    )
    example_config = {"path": "myproject.tokens.make_token"}

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        path = config.get("path")
        if "path" not in config:
            return
        if not isinstance(path, str) or "." not in path:
            errors.add("config", "path: must be a dotted path such as package.module.function")
            return
        try:
            load(path)
        except (ImportError, TypeError) as error:
            errors.add("config", f"path: cannot import a callable from {path!r} ({error})")

    def generate(self, provider: Provider) -> GeneratedToken:
        try:
            result = load(provider.config["path"])(provider)
        except GeneratorError:
            raise
        except Exception as error:  # the project's code: report the class, never its text
            raise GeneratorError(
                f"callable {provider.config['path']} raised {type(error).__name__}",
                transient=True,
            ) from None
        now = datetime.now(UTC)
        if isinstance(result, GeneratedToken):
            checked = token_from_mapping(
                {
                    "access_token": result.access_token,
                    "token_type": result.token_type,
                    "expires_at": result.expires_at,
                },
                now=now,
            )
            # A GeneratedToken without expires_at does not expire (no default lifetime).
            return checked if result.expires_at else replace(checked, expires_at=None)
        if isinstance(result, str):
            return token_from_mapping({"access_token": result}, now=now)
        if isinstance(result, Mapping):
            return token_from_mapping(result, now=now)
        raise GeneratorError(
            f"callable returned {type(result).__name__}; expected str, mapping or GeneratedToken",
            transient=False,
        )
