from __future__ import annotations

from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("static")


def test_generate__the_secret_is_the_token_and_never_expires() -> None:
    token = GENERATOR.generate(Provider(name="s", kind="static", secret="fixed-token"))
    assert token.access_token == "fixed-token"
    assert token.expires_at is None


def test_validate__needs_a_secret_and_no_config() -> None:
    assert GENERATOR.validate({}, "fixed") == {}
    assert "secret" in GENERATOR.validate({}, "")
    assert "config" in GENERATOR.validate({"x": 1}, "fixed")
