"""oauth2_client_credentials against a real local HTTP token endpoint."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.factories import SECRET, oauth2_config
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("oauth2_client_credentials")


def provider_for(url: str, **config: object) -> Provider:
    return Provider(
        name="api",
        kind="oauth2_client_credentials",
        config=oauth2_config(url, **config),
        secret=SECRET,
    )


def jwt_with_exp(exp: float) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': exp, 'sub': 'x'})}.sig"


def form(request: Request) -> dict[str, list[str]]:
    return parse_qs(request.get_data(as_text=True))


def test_generate__client_secret_basic_by_default(httpserver: HTTPServer) -> None:
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(
            json.dumps({"access_token": "tok-1", "token_type": "bearer", "expires_in": 3600}),
            content_type="application/json",
        )

    httpserver.expect_request("/token", method="POST").respond_with_handler(handler)
    before = datetime.now(UTC)
    token = GENERATOR.generate(
        provider_for(
            httpserver.url_for("/token"), scope="read write", audience="https://api.example.com"
        )
    )
    assert token.access_token == "tok-1"
    assert token.token_type == "Bearer"
    assert token.expires_at is not None
    assert (
        before + timedelta(seconds=3599)
        <= token.expires_at
        <= datetime.now(UTC) + timedelta(seconds=3600)
    )
    body = form(seen[0])
    assert body["grant_type"] == ["client_credentials"]
    assert body["scope"] == ["read write"]
    assert body["audience"] == ["https://api.example.com"]
    assert "client_secret" not in body
    expected = base64.b64encode(f"client-1:{SECRET}".encode()).decode()
    assert seen[0].headers["Authorization"] == f"Basic {expected}"


def test_generate__client_secret_post_and_extra_params(httpserver: HTTPServer) -> None:
    seen: list[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(json.dumps({"access_token": "tok-2"}), content_type="application/json")

    httpserver.expect_request("/token").respond_with_handler(handler)
    GENERATOR.generate(
        provider_for(
            httpserver.url_for("/token"),
            auth_method="client_secret_post",
            extra_params={"resource": "r1"},
        )
    )
    body = form(seen[0])
    assert body["client_id"] == ["client-1"]
    assert body["client_secret"] == [SECRET]
    assert body["resource"] == ["r1"]
    assert "Authorization" not in seen[0].headers


@pytest.mark.parametrize("expires_in", ["3599", 3599, 3599.0, " 3599 "])
def test_generate__expires_in_as_number_or_numeric_string(
    httpserver: HTTPServer, expires_in: object
) -> None:
    httpserver.expect_request("/token").respond_with_json(
        {"access_token": "t", "expires_in": expires_in}
    )
    token = GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert token.expires_at is not None
    assert abs((token.expires_at - datetime.now(UTC)).total_seconds() - 3599) < 5


def test_generate__expiry_from_jwt_exp_claim_when_no_expires_in(httpserver: HTTPServer) -> None:
    exp = int(time.time()) + 1234
    httpserver.expect_request("/token").respond_with_json({"access_token": jwt_with_exp(exp)})
    token = GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert token.expires_at == datetime.fromtimestamp(exp, tz=UTC)


def test_generate__default_lifetime_when_issuer_gives_no_expiry(
    httpserver: HTTPServer, settings
) -> None:
    settings.TOKENS_DEFAULT_LIFETIME = 120
    httpserver.expect_request("/token").respond_with_json({"access_token": "opaque"})
    token = GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert abs((token.expires_at - datetime.now(UTC)).total_seconds() - 120) < 5


def test_generate__huge_expires_in_is_clamped(httpserver: HTTPServer, settings) -> None:
    settings.TOKENS_MAX_LIFETIME = timedelta(days=1)
    httpserver.expect_request("/token").respond_with_json(
        {"access_token": "t", "expires_in": 10**12}
    )
    token = GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert abs((token.expires_at - datetime.now(UTC)).total_seconds() - 86400) < 5


def test_generate__long_token_is_kept_whole(httpserver: HTTPServer) -> None:
    value = "Az09-._~+/!|" * 5000 + "=="
    httpserver.expect_request("/token").respond_with_json({"access_token": value, "expires_in": 60})
    assert GENERATOR.generate(provider_for(httpserver.url_for("/token"))).access_token == value


def test_generate__non_ascii_token_is_refused(httpserver: HTTPServer) -> None:
    # It could not go into an Authorization header as it is (the former "kept whole" case).
    httpserver.expect_request("/token").respond_with_json({"access_token": "ü" * 50})
    with pytest.raises(GeneratorError, match="characters a token may not have"):
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))


@pytest.mark.parametrize(
    ("status", "body", "content_type", "transient", "fragment"),
    [
        (401, {"error": "invalid_client"}, "application/json", False, "invalid_client"),
        (
            400,
            {"error": "invalid_scope", "error_description": "no such scope"},
            "application/json",
            False,
            "invalid_scope",
        ),
        (400, {"error": "invalid_grant"}, "application/json", False, "invalid_grant"),
        (
            503,
            {"error": "temporarily_unavailable"},
            "application/json",
            True,
            "temporarily_unavailable",
        ),
        (500, "boom", "text/plain", True, "HTTP 500"),
        (502, "<html>bad gateway</html>", "text/html", True, "HTTP 502"),
        (429, "slow down", "text/plain", True, "HTTP 429"),
        (404, "<html>not found</html>", "text/html", False, "HTTP 404"),
        (403, {"message": "forbidden"}, "application/json", False, "HTTP 403"),
        (200, "<html>login page</html>", "text/html", True, "non-JSON body (text/html)"),
        (200, {"token_type": "bearer"}, "application/json", False, "no access_token"),
        (
            200,
            {"access_token": "t", "expires_in": "soon"},
            "application/json",
            False,
            "non-numeric expires_in",
        ),
        (200, {"access_token": "t", "expires_in": -5}, "application/json", False, "non-positive"),
        (200, {"access_token": ""}, "application/json", False, "no access_token"),
        (200, ["not", "an", "object"], "application/json", True, "non-JSON body"),
    ],
)
def test_generate__bad_responses_become_classified_generator_errors(
    httpserver: HTTPServer,
    status: int,
    body: object,
    content_type: str,
    transient: bool,
    fragment: str,
) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    httpserver.expect_request("/token").respond_with_data(
        data, status=status, content_type=content_type
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert caught.value.transient is transient
    assert fragment in str(caught.value)
    assert SECRET not in str(caught.value)


def test_generate__429_reports_retry_after(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_data(
        "", status=429, headers={"Retry-After": "17"}
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert caught.value.transient and caught.value.retry_after == 17


def test_generate__retry_after_as_an_http_date(httpserver: HTTPServer) -> None:
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    httpserver.expect_request("/token").respond_with_data(
        "", status=503, headers={"Retry-After": when}
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert 25 <= caught.value.retry_after <= 30


def test_generate__error_text_is_truncated_and_not_the_whole_body(httpserver: HTTPServer) -> None:
    description = "x" * 5000
    httpserver.expect_request("/token").respond_with_json(
        {"error": "invalid_client", "error_description": description}, status=401
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert len(str(caught.value)) < 300
    # The issuer's words travel apart from tokens' own, for the refresh to scrub, then cut.
    assert "x" * 100 not in str(caught.value)
    assert caught.value.detail == description[:4096]


def test_generate__timeout_is_transient(httpserver: HTTPServer, settings) -> None:
    settings.TOKENS_HTTP_TIMEOUT = 0.3

    def slow(request: Request) -> Response:
        time.sleep(1.0)
        return Response("{}", content_type="application/json")

    httpserver.expect_request("/token").respond_with_handler(slow)
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert caught.value.transient
    assert "did not answer within 0.3s" in str(caught.value)


def test_generate__unreachable_endpoint_is_transient() -> None:
    from project.embedded_redis import free_port

    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(f"http://127.0.0.1:{free_port()}/token"))
    assert caught.value.transient
    assert "cannot reach the token endpoint" in str(caught.value)


def test_generate__does_not_follow_redirects(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/token").respond_with_data(
        "", status=302, headers={"Location": "/elsewhere"}
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider_for(httpserver.url_for("/token")))
    assert "HTTP 302" in str(caught.value)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("config", "secret", "field", "fragment"),
    [
        ({"client_id": "c"}, SECRET, "config", "token_url: this key is required"),
        ({"token_url": "https://a.example/t"}, SECRET, "config", "client_id: this key is required"),
        (
            {"token_url": "https://a.example/t", "client_id": "c"},
            "",
            "secret",
            "a secret is required",
        ),
        (
            {"token_url": "http://auth.example.com/t", "client_id": "c"},
            SECRET,
            "config",
            "must use https",
        ),
        (
            {"token_url": "ftp://auth.example.com/t", "client_id": "c"},
            SECRET,
            "config",
            "absolute http(s) URL",
        ),
        ({"token_url": "not a url", "client_id": "c"}, SECRET, "config", "absolute http(s) URL"),
        ({"token_url": "http://[::1", "client_id": "c"}, SECRET, "config", "absolute http(s) URL"),
        (
            {"token_url": "https://a.example:99999/t", "client_id": "c"},
            SECRET,
            "config",
            "absolute http(s) URL",
        ),
        ({"token_url": 5, "client_id": "c"}, SECRET, "config", "token_url: must be a URL string"),
        (
            {"token_url": "https://a.example/t", "client_id": ""},
            SECRET,
            "config",
            "client_id: must be a non-empty string",
        ),
        (
            {"token_url": "https://a.example/t", "client_id": "c", "auth_method": "magic"},
            SECRET,
            "config",
            "auth_method: must be one of",
        ),
        (
            {"token_url": "https://a.example/t", "client_id": "c", "extra_params": {"a": 1}},
            SECRET,
            "config",
            "extra_params: must be an object",
        ),
        (
            {
                "token_url": "https://a.example/t",
                "client_id": "c",
                "extra_params": {"grant_type": "x"},
            },
            SECRET,
            "config",
            "may not set grant_type",
        ),
        (
            {"token_url": "https://a.example/t", "client_id": "c", "colour": "red"},
            SECRET,
            "config",
            "colour: unknown key",
        ),
        (["not", "a", "dict"], SECRET, "config", "must be a JSON object"),
    ],
)
def test_validate__field_level_errors(
    config: object, secret: str, field: str, fragment: str
) -> None:
    errors = GENERATOR.validate(config, secret)
    assert any(fragment in message for message in errors.get(field, [])), errors


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/t",
        "http://127.0.0.1/t",
        "http://[::1]:9/t",
        "https://auth.example.com/t",
    ],
)
def test_validate__https_or_local_http_is_accepted(url: str) -> None:
    assert GENERATOR.validate({"token_url": url, "client_id": "c"}, SECRET) == {}


def test_validate__plain_http_is_accepted_under_debug(settings) -> None:
    settings.DEBUG = True
    assert (
        GENERATOR.validate({"token_url": "http://auth.internal/t", "client_id": "c"}, SECRET) == {}
    )
