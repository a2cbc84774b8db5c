"""A failed refresh: the retry policy, and what is stored of the error."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer

from tests.factories import SECRET, make_provider, oauth2_config, state
from tokens.services import failures, refresh

pytestmark = pytest.mark.django_db


def test_failures__back_off_exponentially_with_a_cap_and_honour_retry_after(settings) -> None:
    settings.TOKENS_RETRY_BASE = 1
    settings.TOKENS_RETRY_MAX = 20
    delays = [failures.retry_delay(failures=count) for count in range(1, 10)]
    for count, delay in enumerate(delays, start=1):
        upper = min(20, 2 ** (count - 1))
        assert upper / 2 <= delay <= upper
    assert failures.retry_delay(failures=1, retry_after=7) >= 7
    assert failures.retry_delay(failures=1, retry_after=10_000) <= 20


def test_failures__error_text_never_holds_the_secret(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_json(
        {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}, status=401
    )
    provider = make_provider(config=oauth2_config(httpserver.url_for("/token")))
    result = refresh.token_refresh(provider_id=provider.pk)
    assert SECRET not in str(result.error)
    assert SECRET not in state(provider).last_error
    # The issuer echoed the secret: its description is withheld whole, the error code kept.
    assert state(provider).last_error == (
        "permanent: token endpoint answered HTTP 401 with error 'invalid_client': "
        "[the issuer's description is withheld: it echoed a credential]"
    )
