"""Key rotation: re-encrypt every stored secret and token with the first key."""

from __future__ import annotations

from django.db import transaction

from tokens import crypto, selectors
from tokens.exceptions import KeyRotationRefused
from tokens.models import Provider, Token


def encryption_keys_unreadable() -> list[str]:
    """The stored secrets and tokens that no key of TOKENS_ENCRYPTION_KEYS opens (described by
    provider name and token version, never by content)."""
    return [what for what, raw in selectors.stored_ciphertexts() if not crypto.opens(raw)]


def encryption_keys_rotate() -> int:
    """Re-encrypt every stored secret and token with the first key; returns rows rewritten.

    Refuses (KeyRotationRefused, nothing rewritten) when any row does not open with the keys:
    rotating would otherwise fail half-way, or tempt an operator to drop the key it needs.
    """
    unreadable = encryption_keys_unreadable()
    if unreadable:
        shown = ", ".join(unreadable[:10]) + (" …" if len(unreadable) > 10 else "")
        raise KeyRotationRefused(
            f"{len(unreadable)} stored value(s) do not open with TOKENS_ENCRYPTION_KEYS "
            f"({shown}): put back the key they were encrypted with (after the new one), then "
            "run this again"
        )
    rewritten = 0
    with transaction.atomic():
        for pk, secret in Provider.objects.values_list("pk", "secret"):
            Provider.objects.filter(pk=pk).update(secret=secret)
            rewritten += 1
        for pk, value in Token.objects.values_list("pk", "value"):
            Token.objects.filter(pk=pk).update(value=value)
            rewritten += 1
    return rewritten
