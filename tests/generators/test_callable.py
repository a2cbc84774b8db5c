from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.core.exceptions import ValidationError

from tests.factories import SECRET, make_provider
from tokens.constants import Outcome, Reason
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider
from tokens.services import refresh

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
        ({"path": "nodots"}, "listed in TOKENS_CALLABLES"),
        ({"path": "os.system"}, "listed in TOKENS_CALLABLES"),
        ({"path": "no_such_module.fn"}, "listed in TOKENS_CALLABLES"),
        ({"path": ["tests.callables.mapping"]}, "listed in TOKENS_CALLABLES"),
        ({"path": "tests.callables.missing"}, "cannot import a callable"),
        ({"path": "tests.callables.NOT_CALLABLE"}, "cannot import a callable"),
        ({"path": "tests.callables.mapping", "extra": 1}, "extra: unknown key"),
    ],
)
def test_validate__bad_path_is_a_config_error(config: dict[str, object], fragment: str) -> None:
    errors = GENERATOR.validate(config, "")
    assert any(fragment in message for message in errors["config"]), errors


def test_validate__importable_callable_is_accepted() -> None:
    assert GENERATOR.validate({"path": "tests.callables.mapping"}, "") == {}


@pytest.mark.django_db
def test_unlisted_path__is_never_imported_by_validation_or_by_a_refresh(
    tmp_path, monkeypatch
) -> None:
    """Choosing a function in admin is running code: a path the project did not list in
    TOKENS_CALLABLES is refused without importing its module (whose top-level code would run)."""
    import sys

    from tokens.models import ProviderState

    marker = tmp_path / "imported"
    monkeypatch.setenv("TOKENS_TEST_IMPORT_MARKER", str(marker))
    path = "tests.unlisted_callables.make_token"
    assert GENERATOR.validate({"path": path}, "")["config"]
    provider = Provider(name="fn", kind="callable", config={"path": path})
    with pytest.raises(ValidationError):
        provider.full_clean()
    with pytest.raises(GeneratorError, match="not listed in TOKENS_CALLABLES"):
        GENERATOR.generate(provider)
    # A row written around validation (a bulk update) still cannot run it.
    saved = make_provider("fn", kind="callable", config={"path": "tests.callables.mapping"})
    Provider.objects.filter(pk=saved.pk).update(config={"path": path})
    result = refresh.token_refresh(provider_id=saved.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.FAILED
    assert "TOKENS_CALLABLES" in ProviderState.objects.get(provider=saved).last_error
    assert "tests.unlisted_callables" not in sys.modules
    assert not marker.exists()


@pytest.mark.django_db
def test_generator_that_raises_system_exit__is_a_permanent_failure_not_an_exit() -> None:
    from tokens.models import ProviderState

    provider = make_provider("fn", kind="callable", config={"path": "tests.callables.exits"})
    result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    assert result.outcome == Outcome.FAILED and result.permanent
    assert "raised SystemExit" in ProviderState.objects.get(provider=provider).last_error
