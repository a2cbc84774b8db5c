"""OAuth2 client credentials grant (RFC 6749 §4.4), through authlib's requests client."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from authlib.integrations.requests_client import OAuth2Session
from django.conf import settings

from tokens.conf import tokens_settings
from tokens.exceptions import GeneratorError
from tokens.generators.base import ConfigErrors, GeneratedToken, Generator, token_from_mapping
from tokens.sanitize import describe_body

if TYPE_CHECKING:
    from tokens.models import Provider

# RFC 6749 §5.2: these mean the request or the credentials are wrong; retrying will not help.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
    }
)
AUTH_METHODS = ("client_secret_basic", "client_secret_post")
LOCAL_HOSTS = frozenset({"localhost"})


def _is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After", "").strip()
    if not value or not value.isascii():
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def parse_token_response(response: requests.Response) -> GeneratedToken:
    """Turn a token endpoint response into a token, or a classified, secret-free GeneratorError."""
    status = response.status_code
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, Mapping) and isinstance(data.get("error"), str):
        code = data["error"][:64]
        description = data.get("error_description")
        detail = f": {describe_body(description)}" if isinstance(description, str) else ""
        transient = code not in PERMANENT_ERRORS and (status >= 500 or status == 429)
        if code in {"temporarily_unavailable", "server_error", "slow_down"}:
            transient = True
        raise GeneratorError(
            f"token endpoint answered HTTP {status} with error {code!r}{detail}",
            transient=transient,
            retry_after=_retry_after(response),
        )
    if status == 429 or status >= 500:
        raise GeneratorError(
            f"token endpoint answered HTTP {status}",
            transient=True,
            retry_after=_retry_after(response),
        )
    if status >= 400 or status < 200:
        raise GeneratorError(f"token endpoint answered HTTP {status}", transient=False)
    if not isinstance(data, Mapping):
        content_type = response.headers.get("Content-Type", "unknown").split(";")[0][:60]
        # An HTML page with status 200 is a gateway or captive page, usually passing.
        raise GeneratorError(
            f"token endpoint answered HTTP {status} with a non-JSON body ({content_type})",
            transient=True,
        )
    return token_from_mapping(data, now=datetime.now(UTC))


class _Session(OAuth2Session):
    def parse_response_token(self, resp: requests.Response) -> GeneratedToken:
        return parse_token_response(resp)


class OAuth2ClientCredentials(Generator):
    kind = "oauth2_client_credentials"
    label = "OAuth2 client credentials"
    required_keys = frozenset({"token_url", "client_id"})
    optional_keys = frozenset({"scope", "audience", "auth_method", "extra_params"})
    secret_required = True
    help_text = (
        "RFC 6749 client credentials grant. Keys: token_url (https; http only for localhost), "
        "client_id; optional scope, audience, auth_method (client_secret_basic or "
        "client_secret_post), extra_params (object of extra form fields). "
        "The provider's secret is the client secret."
    )
    example_config = {
        "token_url": "https://auth.example.com/oauth/token",
        "client_id": "my-client",
        "scope": "read write",
    }

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        url = config.get("token_url")
        if "token_url" in config:
            if not isinstance(url, str) or not url:
                errors.add("config", "token_url: must be a URL string")
            else:
                try:
                    parts = urlsplit(url)
                    host = parts.hostname or ""
                    scheme = parts.scheme
                    parts.port  # noqa: B018 - raises ValueError for a bad port
                except ValueError:
                    scheme, host = "", ""
                if scheme not in {"https", "http"} or not host:
                    errors.add("config", "token_url: must be an absolute http(s) URL")
                elif scheme == "http" and not (settings.DEBUG or _is_local(host)):
                    errors.add(
                        "config", "token_url: must use https (http is allowed for localhost only)"
                    )
        for key in ("client_id", "scope", "audience"):
            if key in config and (not isinstance(config[key], str) or not config[key].strip()):
                errors.add("config", f"{key}: must be a non-empty string")
        if config.get("auth_method", AUTH_METHODS[0]) not in AUTH_METHODS:
            errors.add("config", f"auth_method: must be one of {', '.join(AUTH_METHODS)}")
        extra = config.get("extra_params", {})
        if not isinstance(extra, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            errors.add("config", "extra_params: must be an object of string values")
        elif {"grant_type", "client_id", "client_secret"} & set(extra):
            errors.add("config", "extra_params: may not set grant_type, client_id or client_secret")

    def generate(self, provider: Provider) -> GeneratedToken:
        config = provider.config
        params: dict[str, str] = dict(config.get("extra_params") or {})
        if config.get("audience"):
            params["audience"] = config["audience"]
        session = _Session(
            client_id=config["client_id"],
            client_secret=provider.secret,
            token_endpoint_auth_method=config.get("auth_method", AUTH_METHODS[0]),
            scope=config.get("scope"),
        )
        try:
            with session:
                token: GeneratedToken = session.fetch_token(
                    config["token_url"],
                    grant_type="client_credentials",
                    timeout=tokens_settings.seconds("HTTP_TIMEOUT"),
                    allow_redirects=False,
                    **params,
                )
        except GeneratorError:
            raise
        except requests.Timeout:
            raise GeneratorError(
                f"token endpoint did not answer within {tokens_settings.seconds('HTTP_TIMEOUT')}s",
                transient=True,
            ) from None
        except requests.RequestException as error:
            raise GeneratorError(
                f"cannot reach the token endpoint ({type(error).__name__})", transient=True
            ) from None
        return token
