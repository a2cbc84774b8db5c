"""How a client proves who it is to a token endpoint (RFC 6749 §2.3, RFC 7523 §2.2, RFC 8705):
authlib builds each method; tokens' bounded transport sends the request.

- ``client_secret_basic`` (default) and ``client_secret_post``: the client secret.
- ``client_secret_jwt``: a JWT signed with the client secret (HS256, HS384, HS512).
- ``private_key_jwt``: a JWT signed with the private key in the secret (RS256, PS256, ES256);
  a certificate after the key adds its ``x5t#S256`` thumbprint (Entra ID wants it).
- ``tls_client_auth``: the client certificate and key in the secret, presented over mutual TLS.
- ``none``: a public client (only where the kind allows it): the client id alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc7523 import ClientSecretJWT, PrivateKeyJWT

from tokens.generators.base import ConfigErrors
from tokens.generators.keys import (
    KEY_ALGORITHMS,
    SECRET_ALGORITHMS,
    KeyProblem,
    check_algorithm,
    default_algorithm,
    jwk_of,
    pem_bundle,
    shared_key,
)

AUTH_METHODS = (
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
)
PUBLIC = "none"
# Client assertions live this long (RFC 7523 §3: "the JWT MUST contain an exp").
ASSERTION_LIFETIME = 60
KID_LIMIT = 200


@dataclass(frozen=True)
class Prepared:
    """A token request with the client's authentication added."""

    url: str
    headers: dict[str, str]
    body: str = field(repr=False)
    client_cert: str | None = field(default=None, repr=False)


def auth_method(config: Mapping[str, Any]) -> str:
    method = config.get("auth_method", AUTH_METHODS[0])
    return method if isinstance(method, str) else ""


def check_client_auth(
    config: Mapping[str, Any], secret: str, errors: ConfigErrors, *, public_allowed: bool
) -> None:
    """Field errors of the client authentication keys (auth_method, algorithm, kid) and of the
    secret the method needs."""
    method = auth_method(config)
    allowed = AUTH_METHODS + ((PUBLIC,) if public_allowed else ())
    if method not in allowed:
        errors.add("config", f"auth_method: must be one of {', '.join(allowed)}")
        return
    algorithm = config.get("algorithm")
    kid = config.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= KID_LIMIT):
        errors.add("config", f"kid: must be a string of 1 to {KID_LIMIT} characters")
    if method not in ("client_secret_jwt", "private_key_jwt"):
        for key in ("algorithm", "kid"):
            if key in config:
                errors.add("config", f"{key}: only for client_secret_jwt and private_key_jwt")
    if method == PUBLIC:
        if secret:
            errors.add("secret", "a public client (auth_method none) has no secret: leave it empty")
        return
    if not secret:
        errors.add("secret", f"a secret is required for {method}: {_SECRET_OF[method]}")
        return
    jwt_secret = method == "client_secret_jwt"
    if jwt_secret and algorithm is not None and algorithm not in SECRET_ALGORITHMS:
        errors.add("config", f"algorithm: must be one of {', '.join(SECRET_ALGORITHMS)}")
    if method in ("private_key_jwt", "tls_client_auth"):
        try:
            bundle = pem_bundle(secret, certificate_required=method == "tls_client_auth")
        except KeyProblem as unusable:
            errors.add("secret", f"{method}: the secret {unusable}")
            return
        if method == "private_key_jwt":
            if algorithm is not None and algorithm not in KEY_ALGORITHMS:
                errors.add("config", f"algorithm: must be one of {', '.join(KEY_ALGORITHMS)}")
                return
            problem = check_algorithm(
                bundle.key_pem, algorithm or default_algorithm(bundle.key_pem)
            )
            if problem:
                errors.add("secret", f"private_key_jwt: {problem}")
        elif urlsplit(str(config.get("token_url", ""))).scheme != "https":
            errors.add("config", "token_url: tls_client_auth needs an https token endpoint")
    if method == "client_secret_basic" and not _latin1(f"{config.get('client_id', '')}:{secret}"):
        errors.add(
            "secret",
            "client_secret_basic sends the client id and secret as Latin-1: use "
            "client_secret_post for other characters",
        )


_SECRET_OF = {
    "client_secret_basic": "the client secret",
    "client_secret_post": "the client secret",
    "client_secret_jwt": "the client secret (the HMAC key)",
    "private_key_jwt": "the PEM private key (and, for Entra ID, its certificate after it)",
    "tls_client_auth": "the PEM client certificate and its private key",
}


def authenticate(
    config: Mapping[str, Any], *, client_id: str, secret: str, url: str, body: str
) -> Prepared:
    """The token request to ``url`` with ``body`` (a form), authenticated as config says."""
    method = auth_method(config)
    headers: dict[str, str] = {}
    if method in ("client_secret_basic", "client_secret_post", PUBLIC):
        url, headers, body = ClientAuth(client_id, secret, method).prepare(
            "POST", url, headers, body
        )
        return Prepared(url, headers, body)
    if method == "tls_client_auth":
        # RFC 8705 §2.1: the certificate authenticates; the client id goes in the form.
        url, headers, body = ClientAuth(client_id, None, PUBLIC).prepare("POST", url, headers, body)
        return Prepared(url, headers, body, client_cert=secret)
    header: dict[str, str] = {}
    if isinstance(config.get("kid"), str):
        header["kid"] = config["kid"]
    claims = {"exp": int(time.time()) + ASSERTION_LIFETIME}
    if method == "client_secret_jwt":
        signer: ClientSecretJWT = ClientSecretJWT(
            url, claims=claims, headers=header, alg=config.get("algorithm") or SECRET_ALGORITHMS[0]
        )
        key: Any = shared_key(secret)
    else:
        bundle = pem_bundle(secret)
        if bundle.certificate_thumbprint is not None:
            header["x5t#S256"] = bundle.certificate_thumbprint
        signer = PrivateKeyJWT(
            url,
            claims=claims,
            headers=header,
            alg=config.get("algorithm") or default_algorithm(bundle.key_pem),
        )
        key = jwk_of(bundle.key_pem)
    url, headers, body = ClientAuth(client_id, key, signer).prepare("POST", url, headers, body)
    return Prepared(url, headers, body)


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
