"""The errors tokens raises. Their messages are safe to log: never a secret or a token."""

from __future__ import annotations


class TokenError(Exception):
    """Base of every error raised by tokens."""


class UnknownProvider(TokenError, LookupError):
    """No provider has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no token provider named {name!r}")
        self.name = name


class ProviderDisabled(TokenError):
    """The provider exists but is disabled."""

    def __init__(self, name: str) -> None:
        super().__init__(f"token provider {name!r} is disabled")
        self.name = name


class TokenUnavailable(TokenError):
    """No valid token could be had before the deadline."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"no valid token for provider {name!r}: {reason}")
        self.name = name
        self.reason = reason


class GeneratorError(TokenError):
    """A generator could not produce a token.

    ``transient`` errors (timeouts, 5xx, 429, network) are retried with backoff; permanent ones
    (bad credentials, bad scope, other 4xx) wait for the next scheduled run or a config change.
    """

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        return "transient" if self.transient else "permanent"


class DecryptionError(TokenError):
    """Stored ciphertext does not open with any key in TOKENS_ENCRYPTION_KEYS."""
