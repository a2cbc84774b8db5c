"""The errors tokens raises. Their messages are safe to log: never a secret or a token."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

# Celery's time limits are Exceptions; they belong to the task that runs a refresh, never to a
# generator: whoever catches generator errors lets these through.
TIME_LIMITS = (SoftTimeLimitExceeded, TimeLimitExceeded)


class TokenError(Exception):
    """Base of every error raised by tokens."""


def shown(name: object, limit: int = 100) -> str:
    """``name`` as an error message shows it: its repr, cut (a caller may pass a megabyte)."""
    text = repr(name[: limit + 1] if isinstance(name, str) else name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class UnknownProvider(TokenError, LookupError):
    """No provider has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no token provider named {shown(name)}")
        self.name = name


class ProviderDisabled(TokenError):
    """The provider exists but is disabled."""

    def __init__(self, name: str) -> None:
        super().__init__(f"token provider {shown(name)} is disabled")
        self.name = name


class TokenUnavailable(TokenError):
    """No valid token could be had before the deadline."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"no valid token for provider {shown(name)}: {reason}")
        self.name = name
        self.reason = reason


class GeneratorError(TokenError):
    """A generator could not produce a token.

    ``transient`` errors (timeouts, 5xx, 429, network) are retried with backoff; permanent ones
    (bad credentials, bad scope, other 4xx) wait for the next scheduled run or a config change.
    The message is tokens' own words; ``detail`` holds the issuer's (an ``error_description``),
    which may echo what was sent: the refresh scrubs both before they are stored or logged.
    """

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        detail: str = "",
        reconnect: bool = False,
        code: str = "",
    ) -> None:
        super().__init__(message)
        # The issuer's error code (RFC 6749 §5.2 ``error``), when it gave a well-formed one.
        self.code = code
        self.transient = transient
        self.retry_after = retry_after
        self.detail = detail
        # The grant is gone (``invalid_grant`` on a refresh token, or none stored): only a
        # person can help, by connecting the account again.
        self.reconnect = reconnect
        # A rotated refresh token the issuer handed out with an answer that was refused
        # anyway: the grant lives on in it, so it is stored all the same.
        self.refresh_token: str | None = None
        # The credentials the request carried (assertions, codes, refresh tokens, the
        # Authorization header's): the issuer's words must not repeat them either.
        self.sent: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r}, transient={self.transient})"

    @property
    def kind(self) -> str:
        if self.reconnect:
            return "reconnect"
        return "transient" if self.transient else "permanent"


class RefreshFailed(TokenError):
    """A refresh task's provider (or some of a batch's) failed: the task ends failed, so that
    Flower and the task events show it, naming each provider with its error (sanitized, as
    stored). An expected outcome, logged without a traceback; retries are already sent."""


class CacheUnavailable(TokenError):
    """Redis (the cache, locks, claims and notifications) could not be reached.

    The Redis adapters raise it for reads whose answer matters and swallow it (with a log line)
    for writes nobody waits on; nobody else sees redis-py's own errors.
    """


class DecryptionError(TokenError):
    """Stored ciphertext does not open with any key in TOKENS_ENCRYPTION_KEYS."""


class KeyRotationRefused(TokenError):
    """rotate_token_keys found stored values that no key opens; it rewrote nothing."""
