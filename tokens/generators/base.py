"""The generator contract: validate a provider's config, produce a token."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from tokens.conf import tokens_settings
from tokens.exceptions import GeneratorError

if TYPE_CHECKING:
    from tokens.models import Provider

MAX_TOKEN_LENGTH = 64 * 1024
# A token goes into an Authorization header as it is: visible ASCII, no space, no CR/LF, no
# control character. (RFC 6750's b64token is narrower still, but issuers such as Salesforce
# ("!") and Facebook ("|") use RFC 6749's wider VSCHAR set; space is refused from it.)
TOKEN_SYNTAX = re.compile(r"[\x21-\x7E]+")
# RFC 9110 §11.1 auth-scheme: a token of tchars.
TOKEN_TYPE_SYNTAX = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,40}")


@dataclass(frozen=True)
class GeneratedToken:
    """What a generator returns. ``expires_at`` is None when the token does not expire."""

    access_token: str = field(repr=False)
    token_type: str = "Bearer"
    expires_at: datetime | None = None
    # A rotated refresh token that came with it (the grant's next credential), to be stored.
    refresh_token: str | None = field(default=None, repr=False)


class ConfigErrors(dict[str, list[str]]):
    """Field-level validation errors, keyed by Provider field name."""

    def add(self, field_name: str, message: str) -> None:
        self.setdefault(field_name, []).append(message)


class Generator:
    """Base class of the generator kinds.

    Subclasses set the class attributes and implement ``check_config`` and ``generate``.
    """

    kind: ClassVar[str]
    label: ClassVar[str]
    required_keys: ClassVar[frozenset[str]] = frozenset()
    optional_keys: ClassVar[frozenset[str]] = frozenset()
    secret_required: ClassVar[bool] = False
    # Whether the kind keeps a refresh token (Provider.refresh_token) that its issuer rotates:
    # such a credential is never used without the fleet-wide lock.
    uses_refresh_token: ClassVar[bool] = False
    # Whether the schedule refreshes it (a static token never changes: no schedule at all).
    scheduled: ClassVar[bool] = True
    help_text: ClassVar[str] = ""
    example_config: ClassVar[dict[str, Any]] = {}

    def validate(self, config: object, secret: str) -> ConfigErrors:
        """The field-level errors of ``config`` and ``secret`` for this kind (empty when valid)."""
        errors = ConfigErrors()
        if not isinstance(config, Mapping):
            errors.add("config", "must be a JSON object")
            return errors
        for key in sorted(self.required_keys - set(config)):
            errors.add("config", f"{key}: this key is required for {self.kind}")
        for key in sorted(set(config) - self.required_keys - self.optional_keys):
            allowed = ", ".join(sorted(self.required_keys | self.optional_keys)) or "none"
            errors.add("config", f"{key}: unknown key for {self.kind} (allowed: {allowed})")
        if self.secret_required and not secret:
            errors.add("secret", f"a secret is required for {self.kind}")
        self.check_config(config, secret, errors)
        return errors

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        """Add kind-specific errors for ``config`` to ``errors``."""

    def generate(self, provider: Provider) -> GeneratedToken:
        raise NotImplementedError

    def endpoint(self, provider: Provider) -> str | None:
        """The URL the provider's token requests go to, so that a batch keeps to
        TOKENS_HTTP_PER_HOST per endpoint; None when the kind cannot tell (a callable: the HTTP
        layer still bounds whatever it sends)."""
        config = provider.config
        url = config.get("token_url") if isinstance(config, Mapping) else None
        return url if isinstance(url, str) else None

    def secrets(self, provider: Provider) -> list[str]:
        """Every credential of the provider that an issuer's words must never repeat: the
        secret, and any key inside it in another form."""
        return [provider.secret]

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        """Where the secret goes for this config; a stored secret is kept on an edit (left
        blank) only while this stays the same. By default the whole config: any change needs
        the secret again. A kind that knows which keys decide where the secret goes (say, the
        token endpoint's origin) narrows it."""
        return (self.kind, json.dumps(config, sort_keys=True, default=str))


def check_generated(token: GeneratedToken) -> GeneratedToken:
    """Refuse a token that could not go into an Authorization header as it is."""
    value = token.access_token
    if not isinstance(value, str) or not value:
        raise GeneratorError("the generator gave no access token", transient=False)
    if len(value) > MAX_TOKEN_LENGTH:
        raise GeneratorError(
            f"access_token is longer than {MAX_TOKEN_LENGTH} characters", transient=False
        )
    if not TOKEN_SYNTAX.fullmatch(value):
        raise GeneratorError(
            "access_token has characters a token may not have (only visible ASCII: no "
            "spaces, line breaks or control characters)",
            transient=False,
        )
    if not isinstance(token.token_type, str) or not TOKEN_TYPE_SYNTAX.fullmatch(token.token_type):
        raise GeneratorError("token_type is not a valid authentication scheme", transient=False)
    return token


def clamp_lifetime(seconds: float) -> timedelta:
    """A lifetime from the issuer: refused when not positive or below TOKENS_MIN_LIFETIME (a
    token gone before it could be used would turn each read into a refresh), clamped when huge."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise GeneratorError(
            f"token endpoint gave a non-positive or invalid expires_in ({seconds!r})",
            transient=False,
        )
    shortest = tokens_settings.seconds("MIN_LIFETIME")
    if seconds < shortest:
        raise GeneratorError(
            f"token lives {seconds:.3g}s, less than TOKENS_MIN_LIFETIME ({shortest:g}s)",
            transient=False,
        )
    longest = tokens_settings.timedelta("MAX_LIFETIME")
    return longest if seconds >= longest.total_seconds() else timedelta(seconds=seconds)


def parse_expires_in(value: object) -> timedelta:
    """``expires_in`` as an int, a float or a numeric string ("3599")."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            value = None
    if not isinstance(value, int | float):
        raise GeneratorError("token endpoint gave a non-numeric expires_in", transient=False)
    return clamp_lifetime(float(value))


def jwt_expiry(token: str) -> datetime | None:
    """The ``exp`` claim of a JWT access token (unverified: only used to schedule refreshes)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded.encode()))
        exp = claims["exp"] if isinstance(claims, dict) else None
        if isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp):
            return datetime.fromtimestamp(exp, tz=UTC)
    except (ValueError, KeyError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        return None
    return None


def token_from_mapping(data: Mapping[str, Any], *, now: datetime) -> GeneratedToken:
    """Build a token from an RFC 6749 §5.1 style mapping; expiry from ``expires_in``, else
    ``expires_at``, else the JWT ``exp`` claim, else TOKENS_DEFAULT_LIFETIME."""
    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token.strip():
        raise GeneratorError("token response has no access_token", transient=False)
    if len(access_token) > MAX_TOKEN_LENGTH:
        raise GeneratorError(
            f"access_token is longer than {MAX_TOKEN_LENGTH} characters", transient=False
        )
    token_type = data.get("token_type") or "Bearer"
    if not isinstance(token_type, str) or not TOKEN_TYPE_SYNTAX.fullmatch(token_type):
        raise GeneratorError("token response has an invalid token_type", transient=False)
    if token_type.lower() == "bearer":
        token_type = "Bearer"
    expires_at: datetime | None
    if data.get("expires_in") is not None:
        expires_at = now + parse_expires_in(data["expires_in"])
    elif data.get("expires_at") is not None:
        raw = data["expires_at"]
        if isinstance(raw, datetime):
            expires_at = raw if raw.tzinfo else raw.replace(tzinfo=UTC)
        elif isinstance(raw, int | float) and not isinstance(raw, bool):
            expires_at = now + clamp_lifetime(raw - now.timestamp())
        else:
            raise GeneratorError("expires_at must be a datetime or a Unix time", transient=False)
        expires_at = now + clamp_lifetime((expires_at - now).total_seconds())
    else:
        expires_at = jwt_expiry(access_token)
        if expires_at is not None:
            expires_at = now + clamp_lifetime((expires_at - now).total_seconds())
        else:
            expires_at = now + tokens_settings.timedelta("DEFAULT_LIFETIME")
    return check_generated(
        GeneratedToken(access_token=access_token, token_type=token_type, expires_at=expires_at)
    )
