"""OAuth2 client credentials grant (RFC 6749 §4.4): authlib builds the request, tokens sends it."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from authlib.oauth2.auth import ClientAuth
from django.conf import settings

from tokens.exceptions import GeneratorError
from tokens.generators.base import ConfigErrors, GeneratedToken, Generator, token_from_mapping
from tokens.generators.http import HttpResponse, check_ca_certs, post_form

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
# RFC 6749 §5.2: error = 1*( %x20-21 / %x23-5B / %x5D-7E ); we also refuse spaces and cap it.
ERROR_CODE = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]{1,64}")
# The issuer's error_description kept for the refresh to scrub (and then cut much shorter).
DETAIL_LIMIT = 4096
# Form fields the grant sets itself: extra_params may not replace them.
RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "scope",
        "audience",
    }
)
PARAM_NAME = re.compile(r"[A-Za-z0-9_.:~-]{1,64}")
MAX_EXTRA_PARAMS = 20
MAX_PARAM_VALUE = 2048


def _is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after(response: HttpResponse) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date (RFC 9110 §10.2.3)."""
    value = response.headers.get("Retry-After", "").strip()
    if not value or not value.isascii() or len(value) > 64:
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


def parse_token_response(response: HttpResponse) -> GeneratedToken:
    """Turn a token endpoint's answer into a token, or a classified GeneratorError.

    Only a 2xx answer with a JSON object is a token (RFC 6749 §5.1). The issuer's own words (an
    ``error_description``) travel in the error's ``detail``, for the refresh to scrub.
    """
    status = response.status
    try:
        data = json.loads(response.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if isinstance(data, Mapping) and isinstance(data.get("error"), str) and status >= 300:
        code = data["error"]
        if not ERROR_CODE.fullmatch(code):
            code = "(malformed error code)"
        description = data.get("error_description")
        transient = code not in PERMANENT_ERRORS and (status >= 500 or status == 429)
        if code in {"temporarily_unavailable", "server_error", "slow_down"}:
            transient = True
        raise GeneratorError(
            f"token endpoint answered HTTP {status} with error {code!r}",
            transient=transient,
            retry_after=_retry_after(response),
            detail=description[:DETAIL_LIMIT] if isinstance(description, str) else "",
        )
    if status == 429 or status >= 500:
        raise GeneratorError(
            f"token endpoint answered HTTP {status}",
            transient=True,
            retry_after=_retry_after(response),
        )
    if 300 <= status < 400:
        raise GeneratorError(
            f"token endpoint answered HTTP {status}, a redirect: redirects are not followed, "
            "set token_url to the endpoint itself",
            transient=False,
        )
    if not 200 <= status < 300:
        raise GeneratorError(f"token endpoint answered HTTP {status}", transient=False)
    if not isinstance(data, Mapping):
        # An HTML page with status 200 is a gateway or captive page, usually passing.
        raise GeneratorError(
            f"token endpoint answered HTTP {status} with a non-JSON body ({response.content_type})",
            transient=True,
        )
    return token_from_mapping(data, now=datetime.now(UTC))


class OAuth2ClientCredentials(Generator):
    kind = "oauth2_client_credentials"
    label = "OAuth2 client credentials"
    required_keys = frozenset({"token_url", "client_id"})
    optional_keys = frozenset({"scope", "audience", "auth_method", "extra_params", "ca_certs"})
    secret_required = True
    help_text = (
        "RFC 6749 client credentials grant. Keys: token_url (https; http only for localhost), "
        "client_id; optional scope, audience, auth_method (client_secret_basic or "
        "client_secret_post), extra_params (object of extra form fields, nothing else), "
        "ca_certs (PEM of the CAs to trust instead of the system's). "
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
            problem = _url_problem(url)
            if problem:
                errors.add("config", f"token_url: {problem}")
        for key in ("client_id", "scope", "audience"):
            if key in config and (not isinstance(config[key], str) or not config[key].strip()):
                errors.add("config", f"{key}: must be a non-empty string")
        if config.get("auth_method", AUTH_METHODS[0]) not in AUTH_METHODS:
            errors.add("config", f"auth_method: must be one of {', '.join(AUTH_METHODS)}")
        if "ca_certs" in config:
            problem = check_ca_certs(config["ca_certs"])
            if problem:
                errors.add("config", f"ca_certs: {problem}")
        extra = config.get("extra_params", {})
        if not isinstance(extra, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
        ):
            errors.add("config", "extra_params: must be an object of string values")
            return
        if len(extra) > MAX_EXTRA_PARAMS:
            errors.add("config", f"extra_params: at most {MAX_EXTRA_PARAMS} form fields")
        reserved = sorted(RESERVED_PARAMS & set(extra))
        if reserved:
            errors.add(
                "config",
                f"extra_params: may not set {', '.join(reserved)} (the grant sets "
                "grant_type and the client's credentials; scope and audience have keys of "
                "their own)",
            )
        for name, value in extra.items():
            if not PARAM_NAME.fullmatch(name):
                errors.add(
                    "config",
                    "extra_params: field names are 1 to 64 letters, digits or . _ : ~ -",
                )
                break
            if len(value) > MAX_PARAM_VALUE:
                errors.add("config", f"extra_params: {name}: at most {MAX_PARAM_VALUE} characters")
        basic = config.get("auth_method", AUTH_METHODS[0]) == "client_secret_basic"
        if basic and secret and not _latin1(f"{config.get('client_id', '')}:{secret}"):
            errors.add(
                "secret",
                "client_secret_basic sends the client id and secret as Latin-1: use "
                "client_secret_post for other characters",
            )

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        """Who receives the client secret: the token endpoint's origin, and the CAs trusted
        to vouch for it."""
        url = config.get("token_url")
        try:
            parts = urlsplit(url) if isinstance(url, str) else None
            origin = (parts.scheme, parts.hostname, parts.port) if parts else None
        except ValueError:
            origin = None
        return (self.kind, origin, config.get("ca_certs"))

    def generate(self, provider: Provider) -> GeneratedToken:
        config = provider.config
        # The form (RFC 6749 §4.4.2). Config adds fields and nothing else: a field's name is
        # never a keyword argument of anything.
        fields = [("grant_type", "client_credentials")]
        fields += [(key, config[key]) for key in ("scope", "audience") if config.get(key)]
        fields += sorted((config.get("extra_params") or {}).items())
        body = urlencode(fields)
        # authlib adds the client's authentication; tokens' bounded transport sends it.
        auth = ClientAuth(
            config["client_id"], provider.secret, config.get("auth_method", AUTH_METHODS[0])
        )
        url, headers, body = auth.prepare("POST", config["token_url"], {}, body)
        response = post_form(url, body=body, headers=headers, ca_certs=config.get("ca_certs"))
        return parse_token_response(response)


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url:
        return "must be a URL string"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        scheme = parts.scheme
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "must be an absolute http(s) URL"
    if scheme not in {"https", "http"} or not host:
        return "must be an absolute http(s) URL"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user name or password (they would be logged and sent as-is)"
    if parts.fragment or "#" in url:
        return "must not have a fragment"
    if not url.isascii() or any(ch.isspace() or not ch.isprintable() for ch in url):
        return "must be an ASCII URL without spaces"
    if scheme == "http" and not (settings.DEBUG or _is_local(host)):
        return "must use https (http is allowed for localhost only)"
    return None
