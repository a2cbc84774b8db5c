"""Make text from the outside world safe to store and log."""

from __future__ import annotations

from collections.abc import Iterable

MAX_ERROR_LENGTH = 300
MAX_DETAIL_LENGTH = 120


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


def describe_body(text: str) -> str:
    """A short, printable excerpt of issuer-supplied text (an error_description)."""
    text = " ".join(_printable(text).split())
    if len(text) > MAX_DETAIL_LENGTH:
        text = text[: MAX_DETAIL_LENGTH - 1] + "…"
    return text


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Replace every known secret in ``text``, make it printable and cap its length."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    text = " ".join(_printable(text).split())
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text
