"""Client authentication methods (RFC 6749 §2.3, RFC 7523 §2.2, RFC 8705) against real local
token endpoints: authlib's server classes, and a TLS server that requires a client
certificate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import parse_qs

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.keys import TestCA, ec_key_pem, public_pem, rsa_key_pem, self_signed_cert, x5t_s256
from tests.token_servers import AssertionServer, Client, MtlsServer
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("oauth2_client_credentials")
SHARED = "a-client-secret-long-enough-for-hs256"
KEY = rsa_key_pem()
CERTIFICATE = self_signed_cert(KEY, "tokens-client")


@pytest.fixture(scope="module")
def server() -> Iterator[AssertionServer]:
    clients = {
        "basic": Client("client_secret_basic", secret=SHARED),
        "post": Client("client_secret_post", secret=SHARED),
        "hmac": Client("client_secret_jwt", secret=SHARED),
        "rsa": Client("private_key_jwt", public_key_pem=public_pem(KEY)),
        "ec": Client("private_key_jwt", public_key_pem=public_pem(ec_key_pem())),
    }
    with AssertionServer(clients=clients) as running:
        yield running


def provider(url: str, client_id: str, secret: str, **config: object) -> Provider:
    return Provider(
        name="api",
        kind="oauth2_client_credentials",
        config={"token_url": url, "client_id": client_id, **config},
        secret=secret,
    )


@pytest.mark.parametrize(
    ("client_id", "method", "secret", "extra"),
    [
        ("basic", "client_secret_basic", SHARED, {}),
        ("post", "client_secret_post", SHARED, {}),
        ("hmac", "client_secret_jwt", SHARED, {}),
        ("rsa", "private_key_jwt", KEY, {"kid": "key-2026"}),
        ("ec", "private_key_jwt", ec_key_pem(), {}),
    ],
)
def test_generate__each_client_authentication_method(
    server: AssertionServer, client_id: str, method: str, secret: str, extra: dict[str, str]
) -> None:
    subject = provider(server.token_url, client_id, secret, auth_method=method, **extra)
    assert not GENERATOR.validate(subject.config, subject.secret)
    token = GENERATOR.generate(subject)
    assert token.access_token and token.expires_at is not None
    request = server.requests[-1]
    assert request.status == 200 and request.auth_method == method
    if method.endswith("_jwt"):
        assertion = request.client_assertion
        assert assertion is not None
        assert assertion.claims["iss"] == assertion.claims["sub"] == client_id
        assert assertion.claims["aud"] == server.token_url
        assert assertion.claims["exp"] - assertion.claims["iat"] <= 60  # short-lived
        assert assertion.header["alg"] == extra.get(
            "algorithm",
            {"client_secret_jwt": "HS256"}.get(method, "ES256" if client_id == "ec" else "RS256"),
        )
        if "kid" in extra:
            assert assertion.header["kid"] == extra["kid"]
        assert SHARED not in str(request.form) and "BEGIN" not in str(request.form)


def test_generate__private_key_jwt_with_a_certificate_sends_its_thumbprint(
    server: AssertionServer,
) -> None:
    """Entra ID identifies a certificate credential by x5t#S256."""
    subject = provider(server.token_url, "rsa", KEY + CERTIFICATE, auth_method="private_key_jwt")
    assert not GENERATOR.validate(subject.config, subject.secret)
    GENERATOR.generate(subject)
    header = server.requests[-1].client_assertion.header  # type: ignore[union-attr]
    assert header["x5t#S256"] == x5t_s256(CERTIFICATE)


def test_generate__private_key_jwt_with_another_key_is_refused(server: AssertionServer) -> None:
    subject = provider(server.token_url, "rsa", rsa_key_pem("other"), auth_method="private_key_jwt")
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(subject)
    assert not caught.value.transient and "invalid_client" in str(caught.value)


@pytest.mark.parametrize(
    ("config", "secret", "field", "fragment"),
    [
        ({"auth_method": "private_key_jwt"}, "not a key", "secret", "PEM text of a private key"),
        ({"auth_method": "private_key_jwt", "algorithm": "ES256"}, KEY, "secret", "P-256"),
        ({"auth_method": "private_key_jwt"}, ec_key_pem(), "secret", None),
        ({"auth_method": "private_key_jwt", "algorithm": "RS256"}, ec_key_pem(), "secret", "RSA"),
        ({"auth_method": "private_key_jwt", "algorithm": "HS256"}, KEY, "config", "algorithm"),
        (
            {"auth_method": "private_key_jwt"},
            KEY + self_signed_cert(rsa_key_pem("other"), "x"),
            "secret",
            "not the private key's",
        ),
        ({"auth_method": "tls_client_auth"}, KEY, "secret", "client certificate"),
        ({"auth_method": "client_secret_jwt", "algorithm": "RS256"}, SHARED, "config", "HS256"),
        ({"auth_method": "client_secret_basic", "kid": "k"}, SHARED, "config", "kid: only"),
        ({"auth_method": "none"}, "", "config", "auth_method: must be one of"),
        ({"auth_method": "private_key_jwt"}, "", "secret", "PEM private key"),
    ],
)
def test_validate__keys_are_checked_on_save(
    config: dict[str, str], secret: str, field: str, fragment: str | None
) -> None:
    full = {"token_url": "https://auth.example/token", "client_id": "c", **config}
    errors = GENERATOR.validate(full, secret)
    if fragment is None:
        assert not errors, errors
        return
    assert any(fragment in message for message in errors.get(field, [])), errors
    assert "MII" not in str(errors)  # no piece of a key in a message


def test_validate__an_encrypted_private_key_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(KEY.encode(), password=None)
    encrypted = loaded.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()
    errors = GENERATOR.validate(
        {"token_url": "https://a.example/t", "client_id": "c", "auth_method": "private_key_jwt"},
        encrypted,
    )
    assert any("without a passphrase" in message for message in errors["secret"]), errors


@pytest.fixture(scope="module")
def authority() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def mtls(authority: TestCA) -> Iterator[MtlsServer]:
    with MtlsServer(
        authority, client_id="mtls-client", expected_subject_cn="tokens-mtls"
    ) as server:
        yield server


def test_generate__tls_client_auth_over_mutual_tls(authority: TestCA, mtls: MtlsServer) -> None:
    certificate, key = authority.issue("tokens-mtls")
    subject = provider(
        mtls.token_url,
        "mtls-client",
        certificate + key,
        auth_method="tls_client_auth",
        ca_certs=authority.cert_pem,
    )
    assert not GENERATOR.validate(subject.config, subject.secret)
    token = GENERATOR.generate(subject)
    assert token.access_token
    request = mtls.requests[-1]
    assert request.peer_cn == "tokens-mtls" and request.auth_method == "tls_client_auth"
    assert "client_secret" not in request.form


def test_generate__tls_client_auth_with_a_certificate_of_another_ca_is_refused(
    mtls: MtlsServer, authority: TestCA
) -> None:
    certificate, key = TestCA("Another CA").issue("tokens-mtls")
    subject = provider(
        mtls.token_url,
        "mtls-client",
        certificate + key,
        auth_method="tls_client_auth",
        ca_certs=authority.cert_pem,
    )
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(subject)
    # The server's alert reaches Python either as such (permanent) or as a closed connection
    # (the asyncio TLS stream drops it): both name the client certificate.
    assert "client certificate" in str(caught.value)


def test_validate__tls_client_auth_needs_https() -> None:
    certificate, key = TestCA().issue("x")
    errors = GENERATOR.validate(
        {"token_url": "http://127.0.0.1:9/t", "client_id": "c", "auth_method": "tls_client_auth"},
        certificate + key,
    )
    assert any("https" in message for message in errors["config"]), errors


@pytest.mark.parametrize(
    ("method", "secret", "algorithm", "key"),
    [
        ("private_key_jwt", KEY, "PS256", public_pem(KEY)),
        ("client_secret_jwt", SHARED, "HS512", SHARED),
    ],
)
def test_generate__other_algorithms_sign_what_they_say(
    httpserver: HTTPServer, method: str, secret: str, algorithm: str, key: str
) -> None:
    """PS256 and HS512 are outside authlib's server defaults: verified here with joserfc."""
    seen: list[dict[str, str]] = []

    def token(request: Request) -> Response:
        seen.append({k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()})
        return Response(json.dumps({"access_token": "t1", "expires_in": 60}))

    httpserver.expect_request("/token", method="POST").respond_with_handler(token)
    subject = provider(
        httpserver.url_for("/token"), "c1", secret, auth_method=method, algorithm=algorithm
    )
    assert not GENERATOR.validate(subject.config, subject.secret)
    GENERATOR.generate(subject)
    verifier = OctKey.import_key(key) if method == "client_secret_jwt" else RSAKey.import_key(key)
    decoded = jwt.decode(seen[0]["client_assertion"], verifier, algorithms=[algorithm])
    assert decoded.header["alg"] == algorithm
    assert decoded.claims["iss"] == "c1" and decoded.claims["aud"] == httpserver.url_for("/token")
