"""Admin's "Connect": the authorization code grant with PKCE (RFC 6749 §4.1, RFC 7636 S256)
for a connected account, begun by an admin user and finished at ``/tokens/connect/callback/``.

The ``state`` is random, single-use, expires after TOKENS_CONNECT_TIMEOUT, and is kept in the
admin user's session with the PKCE verifier, the user, the provider and where the provider
sent its credentials when the flow began: an answer for another session, another user, or a
provider that changed meanwhile stores nothing.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import salted_hmac

from tokens.conf import tokens_settings
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.generators.connected import OAuth2RefreshToken
from tokens.models import Provider
from tokens.sanitize import WITHHELD, echoes, scrub
from tokens.services.grants import grant_connect

SESSION_KEY = "tokens_connect"
# At most this many Connects pending per session (a person with several tabs).
MAX_PENDING = 5
ERROR_CODE = re.compile(r"[\x21\x23-\x5B\x5D-\x7E]{1,64}")


@dataclass(frozen=True)
class Outcome:
    """How a callback ended, for the admin's message."""

    ok: bool
    message: str
    provider_id: int | None = None


def connectable(provider: Provider) -> bool:
    return provider.pk is not None and isinstance(_generator(provider.kind), OAuth2RefreshToken)


def hosts(provider: Provider) -> tuple[str, str]:
    """Where Connect sends the admin user, and where the code (and then the refresh token)
    goes: shown on the button, so nobody approves for a host they do not expect."""
    config = provider.config if isinstance(provider.config, dict) else {}
    authorize, token = (
        urlsplit(str(config.get(key, ""))).hostname or "?" for key in ("authorize_url", "token_url")
    )
    return authorize, token


def redirect_uri(request: HttpRequest) -> str:
    """The redirect URI to register at the identity provider: TOKENS_PUBLIC_URL (or this
    request's origin) and the callback's path."""
    path = reverse("tokens:connect_callback")
    base = str(tokens_settings.PUBLIC_URL or "").rstrip("/")
    return f"{base}{path}" if base else request.build_absolute_uri(path)


def connect_begin(request: HttpRequest, provider: Provider) -> str:
    """Remember a new state and PKCE verifier in the session; the URL to send the user to."""
    generator = _generator(provider.kind)
    if not isinstance(generator, OAuth2RefreshToken):
        raise ValueError(f"{provider.kind} providers are not connected accounts")
    state = secrets.token_urlsafe(32)
    uri = redirect_uri(request)
    pending = _pending(request)
    pending[state] = {
        "provider": provider.pk,
        "user": request.user.pk,
        "redirect_uri": uri,
        "destination": repr(provider.secret_destination()),
        "started": time.time(),
    }
    while len(pending) > MAX_PENDING:
        oldest = min(pending, key=lambda key: pending[key]["started"])
        del pending[oldest]
    request.session[SESSION_KEY] = pending
    return generator.authorization_url(
        provider.config, redirect_uri=uri, state=state, code_verifier=_verifier(state)
    )


def _verifier(state: str) -> str:
    """The PKCE verifier of a flow, derived from its state with the site's SECRET_KEY: never
    stored (a session row or cookie holds the state, not what redeems the code)."""
    return salted_hmac("tokens.connect.pkce", state, algorithm="sha256").hexdigest()


def connect_finish(request: HttpRequest) -> Outcome:
    """Check the identity provider's answer against the session and, for a code, exchange it
    and store the grant."""
    state = request.GET.get("state", "")
    pending = _pending(request)
    flow = None
    for key in list(pending):
        if hmac.compare_digest(key.encode(), state.encode()):
            flow = pending.pop(key)  # single use, whatever comes of it
            state = key
    request.session[SESSION_KEY] = pending
    if flow is None:
        return Outcome(False, "Connect failed: unknown or already used state; start again.")
    provider_id = int(flow["provider"])
    if flow["user"] != request.user.pk:
        return Outcome(False, "Connect failed: it was begun by another user.", provider_id)
    if time.time() - float(flow["started"]) > tokens_settings.seconds("CONNECT_TIMEOUT"):
        return Outcome(False, "Connect failed: it took too long; start again.", provider_id)
    provider = Provider.objects.filter(pk=provider_id).first()
    if provider is None or repr(provider.secret_destination()) != flow["destination"]:
        return Outcome(
            False, "Connect failed: the provider changed meanwhile; start again.", provider_id
        )
    error = request.GET.get("error")
    if error is not None:
        code = error if ERROR_CODE.fullmatch(error) else "(malformed error code)"
        answered = f"Provider {provider.name}: the identity provider answered {code!r}."
        return Outcome(False, answered, provider_id)
    code = request.GET.get("code", "")
    if not code or len(code) > 4096:
        no_code = f"Provider {provider.name}: the identity provider sent no code."
        return Outcome(False, no_code, provider_id)
    generator = _generator(provider.kind)
    assert isinstance(generator, OAuth2RefreshToken)
    attempted = timezone.now()
    try:
        generated = generator.exchange_code(
            provider, code=code, redirect_uri=flow["redirect_uri"], code_verifier=_verifier(state)
        )
    except GeneratorError as failure:
        credentials = [code, _verifier(state), *failure.sent]
        return Outcome(False, _failure_text(provider, failure, credentials), provider_id)
    grant_connect(provider=provider, generated=generated, attempted=attempted)
    connected = f"Provider {provider.name}: connected; its first token is stored."
    return Outcome(True, connected, provider_id)


def _failure_text(provider: Provider, failure: GeneratorError, sent: list[str]) -> str:
    credentials = [provider.secret, provider.refresh_token, *sent]
    detail = failure.detail
    if detail and echoes(detail, credentials):
        detail = WITHHELD
    text = f"{failure}" + (f": {detail}" if detail else "")
    return f"Provider {provider.name}: connecting failed: {scrub(text, credentials)}"


def _pending(request: HttpRequest) -> dict[str, Any]:
    pending = request.session.get(SESSION_KEY)
    return dict(pending) if isinstance(pending, dict) else {}


def _generator(kind: str) -> object:
    try:
        return get_generator(kind)
    except LookupError:
        return None
