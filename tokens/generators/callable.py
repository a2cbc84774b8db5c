"""A token made by a function of the project's, chosen from TOKENS_CALLABLES.

Choosing a function in admin is running code, so only the functions the project lists in the
setting ``TOKENS_CALLABLES`` (dotted paths) can be chosen; validation checks the path against the
list and imports nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from tokens.conf import tokens_settings
from tokens.exceptions import TIME_LIMITS, GeneratorError
from tokens.generators.base import (
    ConfigErrors,
    GeneratedToken,
    Generator,
    token_from_mapping,
)

if TYPE_CHECKING:
    from tokens.models import Provider


def registered() -> list[str]:
    """The dotted paths of the functions the callable kind may run (TOKENS_CALLABLES)."""
    value = tokens_settings.CALLABLES
    if isinstance(value, str):
        value = value.split(",")
    return [path.strip() for path in value if isinstance(path, str) and path.strip()]


def load(path: str) -> Callable[..., Any]:
    """The registered function at ``path``; LookupError for a path not in TOKENS_CALLABLES."""
    if path not in registered():
        raise LookupError(f"{path} is not listed in TOKENS_CALLABLES")
    function = import_string(path)
    if not callable(function):
        raise TypeError(f"{path} is not callable")
    return function


class CallableGenerator(Generator):
    kind = "callable"
    label = "Python callable"
    required_keys = frozenset({"path"})
    help_text = (
        "Key: path, one of the functions the project lists in TOKENS_CALLABLES, taking the "
        "provider and returning a string, a mapping with access_token and optional expires_in "
        "/ expires_at / token_type, or a tokens.generators.base.GeneratedToken."
    )
    example_config = {"path": "myproject.tokens.make_token"}

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        if "path" not in config:
            return
        path = config["path"]
        allowed = registered()
        if not isinstance(path, str) or path not in allowed:
            listed = ", ".join(allowed) if allowed else "none: the setting is empty"
            errors.add(
                "config",
                f"path: must be one of the functions listed in TOKENS_CALLABLES ({listed})",
            )
            return
        try:
            load(path)
        except (ImportError, TypeError) as error:
            errors.add("config", f"path: cannot import a callable from {path!r} ({error})")

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        return (self.kind, config.get("path"))

    def generate(self, provider: Provider) -> GeneratedToken:
        path = provider.config["path"]
        try:
            function = load(path)
        except (LookupError, ImportError, TypeError) as error:
            raise GeneratorError(f"callable {error}", transient=False) from None
        try:
            result = function(provider)
        except GeneratorError:
            raise
        except Exception as error:  # the project's code: report the class, never its text
            if isinstance(error, TIME_LIMITS):
                raise
            raise GeneratorError(
                f"callable {path} raised {type(error).__name__}", transient=True
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
