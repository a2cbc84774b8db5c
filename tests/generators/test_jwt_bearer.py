"""jwt_bearer (RFC 7523 §2.1) against a real local token endpoint made of authlib's server-side
JWTBearerGrant: a Google service-account JSON key with only a scope, Salesforce-style config,
and keys checked on save."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.keys import ec_key_pem, public_pem, rsa_key_pem
from tests.token_servers import AssertionServer, Issuer
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("jwt_bearer")
ROBOT = "robot@project.iam.gserviceaccount.com"
CONSUMER_KEY = "3MVG9consumer.key"
USER = "integration@example.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
RSA = rsa_key_pem()
EC = ec_key_pem()


@pytest.fixture(scope="module")
def server() -> Iterator[AssertionServer]:
    issuers = {
        ROBOT: Issuer(public_pem(RSA), scopes=[SCOPE]),
        CONSUMER_KEY: Issuer(public_pem(EC), subjects=[USER]),
    }
    with AssertionServer(issuers=issuers) as running:
        running.audiences.append(running.url)  # Salesforce: aud is the login URL
        yield running


def google_key(token_uri: str) -> str:
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "project",
            "private_key_id": "4f1c0ffee",
            "private_key": RSA,
            "client_email": ROBOT,
            "client_id": "1234567890",
            "token_uri": token_uri,
        }
    )


def provider(config: dict[str, object], secret: str) -> Provider:
    return Provider(name="gcp", kind="jwt_bearer", config=config, secret=secret)


def test_generate__google_service_account_json_needs_only_the_scope(
    server: AssertionServer,
) -> None:
    subject = provider({"scope": SCOPE}, google_key(server.token_url))
    assert not GENERATOR.validate(subject.config, subject.secret)
    token = GENERATOR.generate(subject)
    assert token.access_token and token.expires_at is not None
    request = server.requests[-1]
    assert request.status == 200
    assertion = request.assertion
    assert assertion is not None
    assert assertion.claims["iss"] == ROBOT and assertion.claims["aud"] == server.token_url
    assert assertion.claims["scope"] == SCOPE and "sub" not in assertion.claims
    assert assertion.header["kid"] == "4f1c0ffee" and assertion.header["alg"] == "RS256"
    assert 0 < assertion.claims["exp"] - assertion.claims["iat"] <= 300


def test_generate__salesforce_style_issuer_subject_audience(server: AssertionServer) -> None:
    subject = provider(
        {
            "token_url": server.token_url,
            "issuer": CONSUMER_KEY,
            "subject": USER,
            "audience": server.url,
            "algorithm": "ES256",
        },
        EC,
    )
    assert not GENERATOR.validate(subject.config, subject.secret)
    GENERATOR.generate(subject)
    assertion = server.requests[-1].assertion
    assert assertion is not None
    assert (assertion.claims["iss"], assertion.claims["sub"]) == (CONSUMER_KEY, USER)
    assert assertion.claims["aud"] == server.url and assertion.header["alg"] == "ES256"


def test_generate__a_subject_the_server_does_not_allow_is_a_permanent_error(
    server: AssertionServer,
) -> None:
    subject = provider(
        {"token_url": server.token_url, "issuer": CONSUMER_KEY, "subject": "intruder"}, EC
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(subject)
    assert not caught.value.transient
    assert "BEGIN" not in str(caught.value) and "MIG" not in str(caught.value)


def test_generate__a_wrong_key_is_refused(server: AssertionServer) -> None:
    subject = provider(
        {"scope": SCOPE},
        google_key(server.token_url).replace(
            json.dumps(RSA)[1:-1], json.dumps(rsa_key_pem("other"))[1:-1]
        ),
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(subject)
    assert "invalid_grant" in str(caught.value) and not caught.value.transient


@pytest.mark.parametrize(
    ("config", "secret", "field", "fragment"),
    [
        ({"scope": SCOPE}, RSA, "config", "token_url: this key is required"),
        ({"token_url": "https://a.example/t"}, RSA, "config", "issuer: this key is required"),
        ({"token_url": "https://a.example/t", "issuer": "i"}, "junk", "secret", "PEM text"),
        ({"token_url": "https://a.example/t", "issuer": "i"}, "{not json", "secret", "JSON"),
        ({"scope": SCOPE}, '{"type": "authorized_user"}', "secret", "service_account"),
        (
            {"token_url": "https://a.example/t", "issuer": "i", "algorithm": "ES256"},
            RSA,
            "secret",
            "P-256",
        ),
        (
            {"token_url": "https://a.example/t", "issuer": "i", "algorithm": "HS256"},
            RSA,
            "config",
            "algorithm",
        ),
        ({"scope": SCOPE}, None, "secret", "token_uri of the JSON key"),
    ],
)
def test_validate__field_level_errors(
    config: dict[str, str], secret: str | None, field: str, fragment: str
) -> None:
    if secret is None:
        secret = google_key("http://example.com/token")  # http, not local: refused
    errors = GENERATOR.validate(config, secret)
    assert any(fragment in message for message in errors.get(field, [])), errors
    assert "MII" not in str(errors)
