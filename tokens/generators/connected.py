"""Connected accounts: the authorization code grant with PKCE once (a person approves, in
admin's "Connect"), then refresh tokens (RFC 6749 §6), which most issuers rotate on every use.

The refresh token lives in ``Provider.refresh_token`` (encrypted). The refresh service uses it
under the fleet-wide lock only, and stores the rotated one in the same transaction as the access
token, fenced by version: see ``tokens.services.versions``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from tokens.exceptions import GeneratorError
from tokens.generators.base import ConfigErrors, GeneratedToken, Generator
from tokens.generators.client_auth import auth_method, check_client_auth
from tokens.generators.oauth2 import (
    check_ca,
    check_extra_params,
    check_strings,
    check_token_url,
    endpoint_destination,
    parse_token_response,
    token_request,
    url_problem,
)

if TYPE_CHECKING:
    from tokens.models import Provider

# Parameters of the authorization request that the flow sets itself.
AUTHORIZE_RESERVED = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)
NOT_CONNECTED = (
    "not connected: no refresh token is stored (admin: Connect, or paste a refresh token)"
)
GRANT_GONE = (
    "the identity provider refused the refresh token (invalid_grant: revoked, expired, or "
    "the person's consent was withdrawn): connect the account again"
)


class OAuth2RefreshToken(Generator):
    kind = "oauth2_refresh_token"
    label = "OAuth2 connected account (refresh token)"
    required_keys = frozenset({"authorize_url", "token_url", "client_id"})
    optional_keys = frozenset(
        {
            "scope",
            "extra_authorize_params",
            "auth_method",
            "algorithm",
            "kid",
            "ca_certs",
        }
    )
    uses_refresh_token = True
    help_text = (
        "A connected account: a person approves once (the Connect button on the provider's "
        "page: authorization code with PKCE), then refresh tokens, rotated by the issuer, "
        "keep it going. Keys: authorize_url, token_url (https; http only for localhost), "
        "client_id; optional scope, extra_authorize_params (e.g. Google's access_type: "
        "offline), auth_method (client_secret_basic, client_secret_post, client_secret_jwt, "
        "private_key_jwt, tls_client_auth, or none for a public client), algorithm, kid, "
        "ca_certs. The secret is the client secret (empty for a public client); the refresh "
        "token is stored by Connect, or pasted."
    )
    example_config = {
        "authorize_url": "https://login.xero.com/identity/connect/authorize",
        "token_url": "https://identity.xero.com/connect/token",
        "client_id": "my-client",
        "scope": "offline_access accounting.transactions",
    }

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        check_token_url(config, errors)
        if "authorize_url" in config:
            problem = url_problem(config["authorize_url"])
            if problem:
                errors.add("config", f"authorize_url: {problem}")
        check_strings(config, ("client_id", "scope"), errors)
        check_ca(config, errors)
        extra = config.get("extra_authorize_params", {})
        check_extra_params(extra, errors, key="extra_authorize_params")
        if isinstance(extra, Mapping):
            reserved = sorted(AUTHORIZE_RESERVED & set(extra))
            if reserved:
                errors.add(
                    "config",
                    f"extra_authorize_params: may not set {', '.join(reserved)} (the Connect "
                    "flow sets them)",
                )
        check_client_auth(config, secret, errors, public_allowed=True)

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        """The client secret and the refresh token go to the token endpoint."""
        return endpoint_destination(
            self.kind, config.get("token_url"), config.get("ca_certs"), auth_method(config)
        )

    def generate(self, provider: Provider) -> GeneratedToken:
        if not provider.refresh_token:
            raise GeneratorError(NOT_CONNECTED, transient=False, reconnect=True)
        fields = [("grant_type", "refresh_token"), ("refresh_token", provider.refresh_token)]
        try:
            return self._request(provider, fields)
        except GeneratorError as error:
            if error.code == "invalid_grant":
                error.reconnect = True
                error.args = (f"{GRANT_GONE}; {error}",)
            raise

    def authorization_url(
        self, config: Mapping[str, Any], *, redirect_uri: str, state: str, code_verifier: str
    ) -> str:
        """Where to send the person who connects the account (RFC 6749 §4.1.1, RFC 7636)."""
        uri = prepare_grant_uri(
            config["authorize_url"],
            client_id=config["client_id"],
            response_type="code",
            redirect_uri=redirect_uri,
            scope=config.get("scope") or None,
            state=state,
            code_challenge=create_s256_code_challenge(code_verifier),
            code_challenge_method="S256",
        )
        # Extra parameters are data: added to the query, never keyword arguments.
        extra = sorted((config.get("extra_authorize_params") or {}).items())
        return str(add_params_to_uri(uri, extra)) if extra else str(uri)

    def exchange_code(
        self, provider: Provider, *, code: str, redirect_uri: str, code_verifier: str
    ) -> GeneratedToken:
        """The first tokens of a connected account, for the code its person approved."""
        fields = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier),
        ]
        token = self._request(provider, fields)
        if not token.refresh_token:
            raise GeneratorError(
                "the identity provider gave no refresh token: ask for offline access (e.g. "
                "scope offline_access, or Google's access_type=offline and prompt=consent in "
                "extra_authorize_params)",
                transient=False,
            )
        return token

    def _request(self, provider: Provider, fields: list[tuple[str, str]]) -> GeneratedToken:
        config = provider.config
        response = token_request(
            config, client_id=config["client_id"], secret=provider.secret, fields=fields
        )
        return parse_token_response(response, keep_refresh_token=True)
