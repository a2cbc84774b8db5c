"""JWT bearer grant (RFC 7523 §2.1): sign an assertion with the provider's private key and
exchange it for an access token (Google service accounts, Salesforce, many others). authlib
signs the assertion (with joserfc); tokens' bounded transport sends it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from authlib.oauth2.rfc7523.assertion import sign_jwt_bearer_assertion

from tokens.exceptions import GeneratorError
from tokens.generators.base import ConfigErrors, GeneratedToken, Generator
from tokens.generators.http import post_form
from tokens.generators.keys import (
    KEY_ALGORITHMS,
    KeyProblem,
    ServiceAccount,
    check_algorithm,
    default_algorithm,
    jwk_of,
    pem_bundle,
    service_account,
)
from tokens.generators.oauth2 import (
    check_ca,
    check_extra_params,
    check_strings,
    endpoint_destination,
    parse_token_response,
    url_problem,
)

if TYPE_CHECKING:
    from tokens.models import Provider

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The assertion lives this long: enough for one exchange (Google accepts up to an hour).
ASSERTION_LIFETIME = 300


class JwtBearer(Generator):
    kind = "jwt_bearer"
    label = "JWT bearer assertion (service account)"
    optional_keys = frozenset(
        {
            "token_url",
            "issuer",
            "subject",
            "audience",
            "scope",
            "algorithm",
            "kid",
            "extra_params",
            "ca_certs",
        }
    )
    secret_required = True
    help_text = (
        "RFC 7523 JWT bearer grant: signs an assertion (iss, sub, aud, scope, a five-minute "
        "exp) with the secret's private key and exchanges it. Keys: token_url, issuer; "
        "optional subject, audience (default: the token URL), scope, algorithm (RS256, PS256 "
        "or ES256), kid, extra_params, ca_certs. The secret is the PEM private key, or a whole "
        "Google service-account JSON key: then only scope is needed (issuer, kid and "
        "token_url come from the key)."
    )
    example_config = {"scope": "https://www.googleapis.com/auth/cloud-platform"}

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        check_strings(config, ("issuer", "subject", "audience", "scope", "kid"), errors)
        check_ca(config, errors)
        check_extra_params(config.get("extra_params", {}), errors)
        algorithm = config.get("algorithm")
        if algorithm is not None and algorithm not in KEY_ALGORITHMS:
            errors.add("config", f"algorithm: must be one of {', '.join(KEY_ALGORITHMS)}")
            algorithm = None
        account: ServiceAccount | None = None
        if secret:
            try:
                account = service_account(secret)
                key_pem = pem_bundle(account.private_key if account else secret).key_pem
            except KeyProblem as unusable:
                errors.add("secret", f"the secret {unusable}")
            else:
                problem_text = check_algorithm(key_pem, algorithm or default_algorithm(key_pem))
                if problem_text:
                    errors.add("secret", problem_text)
        token_url = config.get("token_url") or (account.token_uri if account else None)
        if token_url is None:
            errors.add(
                "config",
                "token_url: this key is required (unless the secret is a "
                "service-account JSON key with token_uri)",
            )
        else:
            problem = url_problem(token_url)
            if problem:
                where = "token_url" if "token_url" in config else "token_uri of the JSON key"
                errors.add("config" if "token_url" in config else "secret", f"{where}: {problem}")
        if not config.get("issuer") and account is None:
            errors.add(
                "config",
                "issuer: this key is required (unless the secret is a service-account JSON key)",
            )

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        """Assertions signed with the key go to the token endpoint."""
        return endpoint_destination(self.kind, config.get("token_url"), config.get("ca_certs"))

    def endpoint(self, provider: Provider) -> str | None:
        url = provider.config.get("token_url")
        if url is None:
            account = _account(provider.secret)
            url = account.token_uri if account else None
        return url if isinstance(url, str) else None

    def secrets(self, provider: Provider) -> list[str]:
        account = _account(provider.secret)
        return [provider.secret, *([account.private_key] if account else [])]

    def generate(self, provider: Provider) -> GeneratedToken:
        config = provider.config
        account = _account(provider.secret)
        key_pem = pem_bundle(account.private_key if account else provider.secret).key_pem
        token_url = config.get("token_url") or (account.token_uri if account else None)
        issuer = config.get("issuer") or (account.client_email if account else None)
        if not token_url or not issuer:
            raise GeneratorError("jwt_bearer needs token_url and issuer", transient=False)
        kid = config.get("kid") or (account.private_key_id if account else None)
        now = int(time.time())
        claims: dict[str, str] = {}
        fields = [("grant_type", GRANT_TYPE)]
        scope = config.get("scope")
        if scope and account is not None:
            claims["scope"] = scope  # Google reads the scope from the assertion
        elif scope:
            fields.append(("scope", scope))  # RFC 7521 §4.1
        assertion = sign_jwt_bearer_assertion(
            key=jwk_of(key_pem),
            issuer=issuer,
            audience=config.get("audience") or token_url,
            subject=config.get("subject") or None,
            issued_at=now,
            expires_at=now + ASSERTION_LIFETIME,
            claims=claims,
            header={"kid": kid} if kid else {},
            alg=config.get("algorithm") or default_algorithm(key_pem),
        )
        fields.append(("assertion", assertion))
        fields += sorted((config.get("extra_params") or {}).items())
        response = post_form(token_url, body=urlencode(fields), ca_certs=config.get("ca_certs"))
        return parse_token_response(response)


def _account(secret: str) -> ServiceAccount | None:
    try:
        return service_account(secret)
    except KeyProblem:
        return None
