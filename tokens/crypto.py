"""Encryption at rest (cryptography's MultiFernet) and display fingerprints."""

from __future__ import annotations

import functools
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.core.exceptions import ImproperlyConfigured
from django.utils.crypto import salted_hmac

from tokens.conf import tokens_settings
from tokens.exceptions import DecryptionError


@functools.lru_cache(maxsize=4)
def _multi_fernet(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise ImproperlyConfigured(
            "TOKENS_ENCRYPTION_KEYS is not set: tokens refuses to store secrets in plaintext. "
            "Set it to one or more comma-separated Fernet keys; make one with: python -c "
            '"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"'
        )
    fernets = []
    for position, key in enumerate(keys, start=1):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError) as error:
            raise ImproperlyConfigured(
                f"TOKENS_ENCRYPTION_KEYS: key #{position} is not a valid Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from error
    return MultiFernet(fernets)


def multi_fernet() -> MultiFernet:
    return _multi_fernet(tuple(tokens_settings.encryption_keys()))


def check_keys() -> None:
    """Raise ImproperlyConfigured unless TOKENS_ENCRYPTION_KEYS holds valid keys."""
    multi_fernet()


def encrypt(plaintext: str) -> str:
    return multi_fernet().encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str, *, what: str = "a stored value") -> str:
    try:
        return multi_fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            f"cannot decrypt {what} with any key in TOKENS_ENCRYPTION_KEYS "
            "(was it encrypted with a key that has been removed?)"
        ) from None


def opens(ciphertext: str) -> bool:
    """Whether ``ciphertext`` decrypts with one of the keys."""
    try:
        multi_fernet().decrypt(ciphertext.encode())
    except (InvalidToken, ValueError, TypeError):
        return False
    return True


def key_fingerprint(key: str) -> str:
    """A short public name of a Fernet key (a SHA-256 prefix): tells keys apart, reveals none."""
    return hashlib.sha256(key.strip().encode()).hexdigest()[:12]


def key_fingerprints() -> list[str]:
    """The fingerprints of TOKENS_ENCRYPTION_KEYS, in order (the first encrypts)."""
    return [key_fingerprint(key) for key in tokens_settings.encryption_keys()]


def fingerprint(token: str) -> str:
    """A short, keyed, one-way fingerprint for display: tells tokens apart, reveals nothing."""
    return salted_hmac("tokens.fingerprint", token, algorithm="sha256").hexdigest()[:12]
