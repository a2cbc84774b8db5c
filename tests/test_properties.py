"""Property-based: whatever a token endpoint answers and whatever config an operator types, tokens
raises only its documented errors (GeneratorError, ValidationError), never crashes."""

from __future__ import annotations

import json
import os
from datetime import timedelta

import httpx
import pytest
from django.core.exceptions import ValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokens.exceptions import GeneratorError
from tokens.generators import GeneratedToken, registry
from tokens.generators.base import TOKEN_SYNTAX
from tokens.generators.http import HttpResponse
from tokens.generators.oauth2 import parse_token_response
from tokens.models import Provider

# HYPOTHESIS_EXAMPLES=5000 for a longer hunt than the suite's.
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", 250))
LENIENT = [HealthCheck.function_scoped_fixture]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)
token_fields = st.fixed_dictionaries(
    {},
    optional={
        "access_token": st.one_of(st.text(max_size=300), json_values),
        "expires_in": st.one_of(st.integers(), st.floats(), st.text(max_size=12), json_values),
        "expires_at": json_values,
        "token_type": st.one_of(st.sampled_from(["Bearer", "bearer", "MAC", ""]), json_values),
        "error": st.one_of(st.sampled_from(["invalid_client", "server_error", "x"]), json_values),
        "error_description": json_values,
    },
)
bodies = st.one_of(
    token_fields.map(lambda fields: json.dumps(fields, allow_nan=True).encode()),
    json_values.map(lambda value: json.dumps(value, allow_nan=True).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
)


def make_response(status: int, body: bytes, content_type: str, retry_after: str) -> HttpResponse:
    # As they come off the wire: bytes, in whatever encoding the server chose.
    headers = httpx.Headers(
        [(b"Content-Type", content_type.encode()), (b"Retry-After", retry_after.encode())]
    )
    return HttpResponse(status, headers, body)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=LENIENT)
@given(
    status=st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 429, 500, 502, 503]),
    body=bodies,
    content_type=st.sampled_from(["application/json", "text/html", "text/plain", ""]),
    retry_after=st.one_of(st.just(""), st.text(max_size=5)),
)
def test_parse_token_response__only_tokens_or_generator_errors(
    status: int, body: bytes, content_type: str, retry_after: str
) -> None:
    try:
        token = parse_token_response(make_response(status, body, content_type, retry_after))
    except GeneratorError as error:
        assert isinstance(error.transient, bool)
        assert len(str(error)) < 400
        return
    assert isinstance(token, GeneratedToken)
    assert isinstance(token.access_token, str) and TOKEN_SYNTAX.fullmatch(token.access_token)
    assert token.expires_at is None or token.expires_at.tzinfo is not None


configs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "token_url": st.one_of(
                st.sampled_from(
                    ["https://a.example/t", "http://localhost/t", "ftp://x", "", "http://[::1"]
                ),
                json_values,
            ),
            "client_id": json_values,
            "scope": json_values,
            "audience": json_values,
            "auth_method": st.one_of(
                st.sampled_from(["client_secret_basic", "client_secret_post"]), json_values
            ),
            "extra_params": json_values,
            "path": st.one_of(
                st.sampled_from(["tests.callables.mapping", "os.path", "a.b", "..", "x"]),
                json_values,
            ),
        },
    ),
)


@pytest.mark.django_db
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=LENIENT)
@given(
    kind=st.sampled_from([*registry(), "unknown"]),
    config=configs,
    secret=st.text(max_size=30),
    seconds=st.integers(min_value=-10, max_value=10**6),
)
def test_provider_full_clean__only_validation_errors(
    kind: str, config: object, secret: str, seconds: int
) -> None:
    provider = Provider(
        name="p",
        kind=kind,
        config=config,
        secret=secret,
        refresh_interval=timedelta(seconds=seconds),
    )
    try:
        provider.full_clean()
    except ValidationError as error:
        assert error.message_dict
