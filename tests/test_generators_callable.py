from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests.factories import SECRET
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("callable")


def provider(path: str) -> Provider:
    return Provider(name="fn", kind="callable", config={"path": path}, secret=SECRET)


def test_generate__string_gets_the_default_lifetime(settings) -> None:
    settings.TOKENS_DEFAULT_LIFETIME = 100
    token = GENERATOR.generate(provider("tests.callables.plain_string"))
    assert token.access_token == "plain-fn"
    assert abs((token.expires_at - datetime.now(UTC)).total_seconds() - 100) < 5


def test_generate__mapping_with_expires_in_and_type() -> None:
    token = GENERATOR.generate(provider("tests.callables.mapping"))
    assert (token.access_token, token.token_type) == ("mapped", "MAC")
    assert abs((token.expires_at - datetime.now(UTC)).total_seconds() - 90) < 5


def test_generate__generated_token_is_taken_as_is() -> None:
    assert GENERATOR.generate(provider("tests.callables.generated")).access_token == "gen"
    assert GENERATOR.generate(provider("tests.callables.generated_forever")).expires_at is None


def test_generate__exception_becomes_a_generator_error_without_its_text() -> None:
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider("tests.callables.explodes"))
    assert "raised RuntimeError" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_generate__wrong_return_type_is_a_permanent_error() -> None:
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider("tests.callables.returns_number"))
    assert not caught.value.transient
    assert "returned int" in str(caught.value)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({}, "path: this key is required"),
        ({"path": "nodots"}, "must be a dotted path"),
        ({"path": "tests.callables.missing"}, "cannot import a callable"),
        ({"path": "no_such_module.fn"}, "cannot import a callable"),
        ({"path": "tests.callables.NOT_CALLABLE"}, "cannot import a callable"),
        ({"path": "tests.callables.mapping", "extra": 1}, "extra: unknown key"),
    ],
)
def test_validate__bad_path_is_a_config_error(config: dict[str, object], fragment: str) -> None:
    errors = GENERATOR.validate(config, "")
    assert any(fragment in message for message in errors["config"]), errors


def test_validate__importable_callable_is_accepted() -> None:
    assert GENERATOR.validate({"path": "tests.callables.mapping"}, "") == {}
