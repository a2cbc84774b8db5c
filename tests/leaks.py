"""Looking for a secret the way an attacker would: in any form, and any piece of it."""

from __future__ import annotations

from tokens.sanitize import FRAGMENT, forms_of


def pieces(text: str) -> set[str]:
    return {text[i : i + FRAGMENT] for i in range(len(text) - FRAGMENT + 1)}


def leaked(haystack: str, secret: str) -> set[str]:
    """Every run of FRAGMENT characters of any form of ``secret`` (as is, URL-encoded,
    escaped, inside base64 at any alignment) found in ``haystack``."""
    found: set[str] = set()
    for form in forms_of(secret):
        found |= {piece for piece in pieces(form) if piece in haystack}
    return found
