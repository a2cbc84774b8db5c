"""The local token servers of tests/token_servers.py answer as real ones do, to clients made of
authlib's client side, httpx and joserfc (not the product's code), over real TCP and TLS."""

from __future__ import annotations

import datetime
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc7523 import ClientSecretJWT, PrivateKeyJWT
from authlib.oauth2.rfc7523.assertion import sign_jwt_bearer_assertion
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests.keys import TestCA, ec_key_pem, public_pem, rsa_key_pem
from tests.token_servers import (
    JWT_BEARER,
    AssertionServer,
    Client,
    GitHubAppServer,
    Issuer,
    MtlsServer,
)

pytestmark = pytest.mark.integration

SERVICE_ACCOUNT = "robot@project.iam.gserviceaccount.com"  # Google style: RSA, no sub
CONSUMER_KEY = "3MVG9consumer.key"  # Salesforce style: EC here, sub is the user
USER = "integration@example.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
SECRET = "a-client-secret-long-enough-for-hs256"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def post(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(url, timeout=5, trust_env=False, **kwargs)


@pytest.fixture(scope="module")
def server() -> Iterator[AssertionServer]:
    clients = {
        "pk-client": Client(
            auth_method="private_key_jwt", public_key_pem=public_pem(rsa_key_pem())
        ),
        "cs-client": Client(auth_method="client_secret_jwt", secret=SECRET),
        "basic-client": Client(auth_method="client_secret_basic", secret=SECRET),
        "post-client": Client(auth_method="client_secret_post", secret=SECRET),
    }
    issuers = {
        SERVICE_ACCOUNT: Issuer(public_key_pem=public_pem(rsa_key_pem()), scopes={SCOPE}),
        CONSUMER_KEY: Issuer(public_key_pem=public_pem(ec_key_pem()), subjects={USER}),
    }
    with AssertionServer(clients=clients, issuers=issuers, expires_in=300) as server:
        yield server


def grant(server: AssertionServer, assertion: str, **form: str) -> httpx.Response:
    return post(server.token_url, data={"grant_type": JWT_BEARER, "assertion": assertion, **form})


def test_jwt_bearer_grant_with_an_rsa_key(server: AssertionServer) -> None:
    assertion = sign_jwt_bearer_assertion(
        RSAKey.import_key(rsa_key_pem()), SERVICE_ACCOUNT, server.token_url, alg="RS256"
    )

    response = grant(server, assertion, scope=SCOPE)

    assert response.status_code == 200, response.text
    token = response.json()
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 300
    assert token["scope"] == SCOPE
    assert len(token["access_token"]) == 42
    seen = server.requests[-1]
    assert (seen.grant_type, seen.auth_method, seen.client_id) == (
        JWT_BEARER,
        None,
        SERVICE_ACCOUNT,
    )
    assert seen.assertion is not None
    assert seen.assertion.header["alg"] == "RS256"
    assert seen.assertion.claims["aud"] == server.token_url
    assert seen.form == {"grant_type": JWT_BEARER, "scope": SCOPE}


def test_jwt_bearer_grant_with_an_ec_key_and_a_subject(server: AssertionServer) -> None:
    assertion = sign_jwt_bearer_assertion(
        ECKey.import_key(ec_key_pem()), CONSUMER_KEY, server.token_url, subject=USER, alg="ES256"
    )

    response = grant(server, assertion)

    assert response.status_code == 200, response.text
    assert response.json()["access_token"]
    seen = server.requests[-1]
    assert seen.assertion is not None
    assert seen.assertion.header["alg"] == "ES256"
    assert seen.assertion.claims["sub"] == USER


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("another key", "invalid_grant"),
        ("another audience", "invalid_grant"),
        ("expired", "invalid_grant"),
        ("unknown issuer", "invalid_grant"),
        ("subject not allowed", "invalid_client"),  # authlib's answer to has_granted_permission
        ("scope not allowed", "invalid_scope"),
    ],
)
def test_jwt_bearer_grant_refused(server: AssertionServer, case: str, error: str) -> None:
    key: ECKey | RSAKey = ECKey.import_key(ec_key_pem())
    issuer, audience, subject = CONSUMER_KEY, server.token_url, USER
    expires_at: int | None = None
    form: dict[str, str] = {}
    if case == "another key":
        key = ECKey.import_key(ec_key_pem("other"))
    elif case == "another audience":
        audience = "https://login.example.com"
    elif case == "expired":
        expires_at = int(time.time()) - 120
    elif case == "unknown issuer":
        issuer = "someone-else"
    elif case == "subject not allowed":
        subject = "intruder@example.com"
    else:
        issuer, subject, form = SERVICE_ACCOUNT, "", {"scope": "openid"}
        key = RSAKey.import_key(rsa_key_pem())
    alg = "ES256" if isinstance(key, ECKey) else "RS256"
    assertion = sign_jwt_bearer_assertion(
        key, issuer, audience, subject=subject, expires_at=expires_at, alg=alg
    )

    response = grant(server, assertion, **form)

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert server.requests[-1].error == error
    assert server.requests[-1].client_id is None


def client_credentials(auth: ClientAuth, token_url: str) -> httpx.Response:
    """A client credentials request, signed by authlib's client side."""
    url, headers, body = auth.prepare(
        "POST", token_url, dict(FORM), "grant_type=client_credentials"
    )
    return post(url, headers=headers, content=body)


def test_private_key_jwt(server: AssertionServer) -> None:
    key = RSAKey.import_key(rsa_key_pem())
    auth = ClientAuth("pk-client", key, PrivateKeyJWT(server.token_url))

    response = client_credentials(auth, server.token_url)

    assert response.status_code == 200, response.text
    seen = server.requests[-1]
    assert (seen.auth_method, seen.client_id) == ("private_key_jwt", "pk-client")
    assert seen.client_assertion is not None
    assert seen.client_assertion.claims["iss"] == seen.client_assertion.claims["sub"] == "pk-client"
    assert "client_assertion" not in seen.form


def test_private_key_jwt_refused(server: AssertionServer) -> None:
    other = ClientAuth("pk-client", RSAKey.import_key(rsa_key_pem("other")), PrivateKeyJWT())
    response = client_credentials(other, server.token_url)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_client")

    # The same assertion twice: authlib's jti check (validate_jti) refuses the replay.
    auth = ClientAuth("pk-client", RSAKey.import_key(rsa_key_pem()), PrivateKeyJWT())
    _, headers, body = auth.prepare(
        "POST", server.token_url, dict(FORM), "grant_type=client_credentials"
    )
    assert post(server.token_url, headers=headers, content=body).status_code == 200
    replayed = post(server.token_url, headers=headers, content=body)
    assert (replayed.status_code, replayed.json()["error"]) == (400, "invalid_client")
    assert "used before" in replayed.json()["error_description"]


def test_client_secret_jwt(server: AssertionServer) -> None:
    auth = ClientAuth("cs-client", SECRET, ClientSecretJWT(server.token_url))

    response = client_credentials(auth, server.token_url)

    assert response.status_code == 200, response.text
    seen = server.requests[-1]
    assert (seen.auth_method, seen.client_id) == ("client_secret_jwt", "cs-client")
    assert seen.client_assertion is not None
    assert seen.client_assertion.header["alg"] == "HS256"

    wrong = ClientAuth("cs-client", SECRET + "-not", ClientSecretJWT(server.token_url))
    assert client_credentials(wrong, server.token_url).json()["error"] == "invalid_client"


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_client_secret(server: AssertionServer, method: str) -> None:
    client_id = "basic-client" if method == "client_secret_basic" else "post-client"

    response = client_credentials(ClientAuth(client_id, SECRET, method), server.token_url)

    assert response.status_code == 200, response.text
    seen = server.requests[-1]
    assert (seen.auth_method, seen.client_id) == (method, client_id)
    assert "client_secret" not in seen.form

    wrong = client_credentials(ClientAuth(client_id, "wrong", method), server.token_url)
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")


# --- mutual TLS (RFC 8705 tls_client_auth) ----------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def mtls(ca: TestCA) -> Iterator[MtlsServer]:
    with MtlsServer(ca, client_id="mtls-client", expected_subject_cn="client.example") as server:
        yield server


def tls_post(
    server: MtlsServer,
    ca: TestCA,
    tmp_path: Path,
    cert: tuple[str, str] | None,
    client_id: str = "mtls-client",
) -> httpx.Response:
    context = ssl.create_default_context(cadata=ca.cert_pem)
    if cert is not None:
        (tmp_path / "cert.pem").write_text(cert[0])
        (tmp_path / "key.pem").write_text(cert[1])
        context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with httpx.Client(verify=context, trust_env=False, timeout=5) as client:
        form = {"grant_type": "client_credentials", "client_id": client_id}
        return client.post(server.token_url, data=form)


def test_mtls_with_the_client_certificate(mtls: MtlsServer, ca: TestCA, tmp_path: Path) -> None:
    response = tls_post(mtls, ca, tmp_path, ca.issue("client.example"))

    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "Bearer"
    seen = mtls.requests[-1]
    assert (seen.auth_method, seen.client_id, seen.peer_cn) == (
        "tls_client_auth",
        "mtls-client",
        "client.example",
    )


@pytest.mark.parametrize("cert", ["none", "another CA"])
def test_mtls_handshake_fails(mtls: MtlsServer, ca: TestCA, tmp_path: Path, cert: str) -> None:
    presented = None if cert == "none" else TestCA("Other CA").issue("client.example")
    with pytest.raises(httpx.TransportError):
        tls_post(mtls, ca, tmp_path, presented)


@pytest.mark.parametrize(
    ("cn", "client_id"), [("someone.else", "mtls-client"), ("client.example", "x")]
)
def test_mtls_refuses_another_client(
    mtls: MtlsServer, ca: TestCA, tmp_path: Path, cn: str, client_id: str
) -> None:
    response = tls_post(mtls, ca, tmp_path, ca.issue(cn), client_id=client_id)

    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")
    assert mtls.requests[-1].peer_cn == cn


# --- GitHub App installation tokens -------------------------------------------------------------

APP_ID = 123456
INSTALLATION = 42


@pytest.fixture(scope="module")
def github() -> Iterator[GitHubAppServer]:
    public_key = public_pem(rsa_key_pem("github"))
    with GitHubAppServer(
        app_id=APP_ID, public_key_pem=public_key, installations={INSTALLATION}
    ) as s:
        yield s


def app_jwt(*, iat: int = 0, exp: int = 540, iss: object = APP_ID, key: str = "github") -> str:
    """An app JWT; ``iat``/``exp`` are seconds from now."""
    now = int(time.time())
    claims = {"iss": iss, "iat": now + iat, "exp": now + exp}
    return jwt.encode({"alg": "RS256"}, claims, RSAKey.import_key(rsa_key_pem(key)))


def create_token(
    github: GitHubAppServer, token: str, installation: int = INSTALLATION, **kwargs: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json"}
    return post(github.access_tokens_url(installation), headers=headers, **kwargs)


# GitHub's own example signs iat 60 s back and exp 10 min ahead; an app id may be a string.
@pytest.mark.parametrize("token", [{}, {"iat": -60, "exp": 600}, {"iss": str(APP_ID)}])
def test_github_installation_token(github: GitHubAppServer, token: dict[str, Any]) -> None:
    response = create_token(github, app_jwt(**token))

    assert response.status_code == 201, response.text
    body = response.json()
    assert re.fullmatch(r"ghs_[A-Za-z0-9]{36}", body["token"])
    expires_at = datetime.datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    remaining = expires_at - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=59) < remaining <= datetime.timedelta(hours=1)
    assert body["expires_at"].endswith("Z")
    assert body["repository_selection"] == "all"
    assert body["permissions"]
    seen = github.requests[-1]
    assert seen.jwt is not None
    assert str(seen.jwt.claims["iss"]) == str(APP_ID)
    assert "Authorization" not in seen.headers


def test_github_installation_token_for_some_repositories(github: GitHubAppServer) -> None:
    asked = {"repositories": ["tokens"], "permissions": {"contents": "read"}}

    response = create_token(github, app_jwt(), json=asked)

    assert response.status_code == 201, response.text
    assert response.json()["repository_selection"] == "selected"
    assert response.json()["permissions"] == {"contents": "read"}
    assert github.requests[-1].body == asked


@pytest.mark.parametrize(
    "token",
    [
        {"exp": 660},  # more than 10 minutes ahead
        {"iat": -700, "exp": -60},  # expired
        {"iat": 120, "exp": 600},  # issued in the future
        {"iss": APP_ID + 1},
        {"key": "other"},
        None,  # not a JWT
    ],
)
def test_github_refuses_the_app_jwt(github: GitHubAppServer, token: dict[str, Any] | None) -> None:
    response = create_token(github, "not-a-jwt" if token is None else app_jwt(**token))

    assert response.status_code == 401
    assert set(response.json()) == {"message", "documentation_url"}
    assert github.requests[-1].message == response.json()["message"]


def test_github_unknown_installation(github: GitHubAppServer) -> None:
    response = create_token(github, app_jwt(), installation=7)

    assert response.status_code == 404
    assert response.json()["message"] == "Not Found"
    assert "documentation_url" in response.json()
