"""OAuth2 client credentials grant (RFC 6749 §4.4): authlib builds the request, tokens sends it."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from django.conf import settings

from tokens.exceptions import GeneratorError
from tokens.generators.base import (
    MAX_TOKEN_LENGTH,
    TOKEN_SYNTAX,
    ConfigErrors,
    GeneratedToken,
    Generator,
    token_from_mapping,
)
from tokens.generators.client_auth import auth_method, authenticate, check_client_auth
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


def parse_token_response(
    response: HttpResponse, *, keep_refresh_token: bool = False
) -> GeneratedToken:
    """Turn a token endpoint's answer into a token, or a classified GeneratorError.

    Only a 2xx answer with a JSON object is a token (RFC 6749 §5.1). The issuer's own words (an
    ``error_description``) travel in the error's ``detail``, for the refresh to scrub. With
    ``keep_refresh_token``, a refresh token in the answer comes with the token, or with the
    error when the rest of the answer is refused (it may be the grant's only live credential).
    """
    try:
        return _parse_token_response(response, keep_refresh_token)
    except GeneratorError as error:
        error.sent = list(response.sent)
        raise


def _parse_token_response(response: HttpResponse, keep_refresh_token: bool) -> GeneratedToken:
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
            code=code,
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
    refresh_token = refresh_token_of(data) if keep_refresh_token else None
    try:
        token = token_from_mapping(data, now=response.started or datetime.now(UTC))
    except GeneratorError as error:
        error.refresh_token = refresh_token
        raise
    return dataclasses.replace(token, refresh_token=refresh_token)


def refresh_token_of(data: Mapping[str, Any]) -> str | None:
    """The refresh token of a token answer (RFC 6749 §5.1), when it holds a usable one."""
    value = data.get("refresh_token")
    if (
        isinstance(value, str)
        and 0 < len(value) <= MAX_TOKEN_LENGTH
        and TOKEN_SYNTAX.fullmatch(value)
    ):
        return value
    return None


def check_extra_params(extra: object, errors: ConfigErrors, *, key: str = "extra_params") -> None:
    """``extra`` is an object of a few extra form fields that the grant does not set itself."""
    if not isinstance(extra, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in extra.items()
    ):
        errors.add("config", f"{key}: must be an object of string values")
        return
    if len(extra) > MAX_EXTRA_PARAMS:
        noun = "form fields" if key == "extra_params" else "parameters"
        errors.add("config", f"{key}: at most {MAX_EXTRA_PARAMS} {noun}")
    reserved = sorted(RESERVED_PARAMS & set(extra))
    if reserved:
        errors.add(
            "config",
            f"{key}: may not set {', '.join(reserved)} (the grant sets those itself; scope "
            "and audience have keys of their own)",
        )
    for name, value in extra.items():
        if not PARAM_NAME.fullmatch(name):
            errors.add("config", f"{key}: field names are 1 to 64 letters, digits or . _ : ~ -")
            break
        if len(value) > MAX_PARAM_VALUE:
            errors.add("config", f"{key}: {name}: at most {MAX_PARAM_VALUE} characters")


def check_token_url(
    config: Mapping[str, Any], errors: ConfigErrors, key: str = "token_url"
) -> None:
    if key in config:
        problem = url_problem(config[key])
        if problem:
            errors.add("config", f"{key}: {problem}")


def check_strings(config: Mapping[str, Any], keys: tuple[str, ...], errors: ConfigErrors) -> None:
    for key in keys:
        if key in config and (not isinstance(config[key], str) or not config[key].strip()):
            errors.add("config", f"{key}: must be a non-empty string")


def endpoint_destination(kind: str, url: object, ca_certs: object, *how: object) -> object:
    """Who receives what a kind sends: the endpoint's origin, and the CAs trusted to vouch
    for it; and ``how`` it is sent (a client authentication method: a private key that signs
    assertions must not be posted as a client secret)."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        origin = (parts.scheme, parts.hostname, parts.port) if parts else None
    except ValueError:
        origin = None
    return (kind, origin, ca_certs, *how)


def token_request(
    config: Mapping[str, Any],
    *,
    client_id: str,
    secret: str,
    fields: list[tuple[str, str]],
    url: str | None = None,
) -> HttpResponse:
    """POST the grant's ``fields`` to the token endpoint, authenticated as the client."""
    prepared = authenticate(
        config,
        client_id=client_id,
        secret=secret,
        url=url or config["token_url"],
        body=urlencode(fields),
    )
    return post_form(
        prepared.url,
        body=prepared.body,
        headers=prepared.headers,
        ca_certs=config.get("ca_certs"),
        client_cert=prepared.client_cert,
    )


class OAuth2ClientCredentials(Generator):
    kind = "oauth2_client_credentials"
    label = "OAuth2 client credentials"
    required_keys = frozenset({"token_url", "client_id"})
    optional_keys = frozenset(
        {"scope", "audience", "auth_method", "algorithm", "kid", "extra_params", "ca_certs"}
    )
    help_text = (
        "RFC 6749 client credentials grant. Keys: token_url (https; http only for localhost), "
        "client_id; optional scope, audience, auth_method (client_secret_basic, "
        "client_secret_post, client_secret_jwt, private_key_jwt or tls_client_auth), algorithm "
        "and kid (for the JWT methods), extra_params (object of extra form fields, nothing "
        "else), ca_certs (PEM of the CAs to trust instead of the system's). The secret is the "
        "client secret; for private_key_jwt the PEM private key (and its certificate, for "
        "Entra ID); for tls_client_auth the PEM client certificate and key."
    )
    example_config = {
        "token_url": "https://auth.example.com/oauth/token",
        "client_id": "my-client",
        "scope": "read write",
    }

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        check_token_url(config, errors)
        check_strings(config, ("client_id", "scope", "audience"), errors)
        check_ca(config, errors)
        check_extra_params(config.get("extra_params", {}), errors)
        check_client_auth(config, secret, errors, public_allowed=False)

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        """Who receives the client secret: the token endpoint's origin, and the CAs trusted
        to vouch for it."""
        return endpoint_destination(
            self.kind, config.get("token_url"), config.get("ca_certs"), auth_method(config)
        )

    def generate(self, provider: Provider) -> GeneratedToken:
        config = provider.config
        # The form (RFC 6749 §4.4.2). Config adds fields and nothing else: a field's name is
        # never a keyword argument of anything.
        fields = [("grant_type", "client_credentials")]
        fields += [(key, config[key]) for key in ("scope", "audience") if config.get(key)]
        fields += sorted((config.get("extra_params") or {}).items())
        response = token_request(
            config, client_id=config["client_id"], secret=provider.secret, fields=fields
        )
        return parse_token_response(response)


def check_ca(config: Mapping[str, Any], errors: ConfigErrors) -> None:
    if "ca_certs" in config:
        problem = check_ca_certs(config["ca_certs"])
        if problem:
            errors.add("config", f"ca_certs: {problem}")


def url_problem(url: object) -> str | None:
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
