"""Make text from the outside world safe to store and log.

An issuer may echo what it was sent: the client secret as it is, URL-encoded (a form body),
JSON- or HTML-escaped, inside base64 (a ``Basic`` header of ``client_id:secret``), or cut short
by its own length limit. ``scrub`` removes every one of those forms, and any run of
FRAGMENT or more characters of them, *before* the text is cut to length, so that no cut can
leave a piece of a secret behind. And since an issuer may encode it in ways no list foresees
(upper case, hex, twice over, masked but for a few characters at each end), ``echoes`` looks
at every decoded view of the issuer's free text: if any holds a run of DETECT characters of a
secret, the text is withheld whole.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import html
import json
import re
from collections.abc import Iterable, Iterator
from urllib.parse import quote, quote_plus, unquote, unquote_plus

MAX_ERROR_LENGTH = 300
# A run of this many characters of a secret (in any of its forms) is redacted wherever it is.
FRAGMENT = 8
# Secrets shorter than this are matched only whole (shorter runs are too common to mean much).
SHORTEST = 4
# Text is scrubbed over at most this many characters (plus the longest form of a secret).
WINDOW = 8 * 1024
REDACTED = "[redacted]"


def _printable(text: str) -> str:
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _base64_cores(data: bytes) -> set[str]:
    """The base64 characters that ``data`` alone decides, at each of the three alignments it
    can have inside a longer encoded string, in both alphabets."""
    cores: set[str] = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + data).decode()
        start = -(-8 * offset // 6)  # the first character with no bit of the padding
        end = 8 * (offset + len(data)) // 6  # past the last character made of data only
        core = encoded[start:end]
        cores.add(core)
        cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def _lower_escapes(text: str) -> str:
    """Percent-escapes in lower case, as .NET's HttpUtility.UrlEncode writes them."""
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def forms_of(secret: str) -> set[str]:
    """Every form in which ``secret`` may come back: as is, URL-encoded (as needed, or every
    byte), JSON- and HTML-escaped, and inside base64 (of itself and of those forms)."""
    plain = {
        secret,
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        html.escape(secret),
        "".join(f"%{byte:02X}" for byte in secret.encode()),
        "".join(f"%{byte:02x}" for byte in secret.encode()),
        _lower_escapes(quote(secret, safe="")),
        _lower_escapes(quote_plus(secret, safe="")),
        quote(secret, safe="").replace("~", "%7E"),  # Java's URLEncoder
        quote_plus(secret, safe="").replace("~", "%7E"),
    }
    forms = set(plain)
    for text in plain:
        forms |= _base64_cores(text.encode("utf-8"))
        with contextlib.suppress(UnicodeEncodeError):
            forms |= _base64_cores(text.encode("latin-1"))
    return {form for form in forms if len(form) >= SHORTEST}


class Scrubber:
    """Redacts every form of the given secrets, and every run of FRAGMENT characters of them."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.whole: set[str] = set()
        self.grams: set[str] = set()
        self.longest = 0
        for secret in secrets:
            if not secret or len(secret) < SHORTEST:
                continue
            for form in forms_of(secret) | forms_of(_printable(secret)):
                self.longest = max(self.longest, len(form))
                if len(form) < FRAGMENT:
                    self.whole.add(form)
                else:
                    self.grams.update(
                        form[i : i + FRAGMENT] for i in range(len(form) - FRAGMENT + 1)
                    )

    def __call__(self, text: str, *, truncated: bool = False) -> str:
        """``text`` without any form or fragment of a secret (a redacted run becomes one mark).

        ``truncated``: the text was cut from a longer one, so a secret may run past its end;
        its last characters (as many as the longest form) are dropped unless redacted.
        """
        kept = len(text) - self.longest if truncated else len(text)
        marked = bytearray(len(text))
        for start in range(len(text) - FRAGMENT + 1):
            if text[start : start + FRAGMENT] in self.grams:
                marked[start : start + FRAGMENT] = b"\x01" * FRAGMENT
        for form in self.whole:
            start = text.find(form)
            while start != -1:
                marked[start : start + len(form)] = b"\x01" * len(form)
                start = text.find(form, start + 1)
        out: list[str] = []
        position = 0
        while position < max(kept, 0):
            if marked[position]:
                while position < len(text) and marked[position]:
                    position += 1
                out.append(REDACTED)
            else:
                out.append(text[position])
                position += 1
        return "".join(out)


def scrub(text: str, secrets: Iterable[str | None], *, limit: int = MAX_ERROR_LENGTH) -> str:
    """``text`` made printable on one line, with every form and fragment of ``secrets``
    redacted, and only then cut to ``limit`` characters."""
    scrubber = Scrubber(secrets)
    window = WINDOW + scrubber.longest
    truncated = len(text) > window
    text = scrubber(_printable(text[:window]), truncated=truncated)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


# The issuer's free text is withheld whole when any decoded view of it holds a run of this many
# characters of a secret, whatever the letter case: it echoed something it should not have.
DETECT = 6
WITHHELD = "[the issuer's description is withheld: it echoed a credential]"
_RUNS = re.compile(r"[A-Za-z0-9+/=_-]{12,}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2}){6,}")


def _decoded(text: str) -> Iterator[str]:
    """``text`` and what it says once decoded: percent-escapes and HTML entities (repeatedly),
    and each run that reads as base64 (twice over) or hex."""
    seen = {text}
    frontier = [text]
    for _ in range(3):
        unwrapped = []
        for view in frontier:
            for decoded in (unquote_plus(view), unquote(view), html.unescape(view)):
                if decoded not in seen:
                    seen.add(decoded)
                    unwrapped.append(decoded)
        frontier = unwrapped
    for view in list(seen):
        for run in _RUNS.findall(view):
            for inner in _from_base64(run):
                seen.add(inner)
                seen.update(_from_base64_runs(inner))
        for run in _HEX.findall(view):
            seen.add(bytes.fromhex(run).decode("latin-1"))
    yield from seen


def _from_base64(run: str) -> list[str]:
    out = []
    for altchars in (b"+/", b"-_"):
        for skip in range(4):  # the run may start mid-group
            chunk = run[skip:].rstrip("=")
            chunk = chunk[: len(chunk) - len(chunk) % 4] if len(chunk) % 4 == 1 else chunk
            try:
                raw = base64.b64decode(chunk + "=" * (-len(chunk) % 4), altchars=altchars)
            except (binascii.Error, ValueError):
                continue
            out.append(raw.decode("latin-1"))
    return out


def _from_base64_runs(text: str) -> list[str]:
    return [inner for run in _RUNS.findall(text) for inner in _from_base64(run)]


def echoes(text: str, secrets: Iterable[str | None]) -> bool:
    """Whether ``text``, in any letter case and once decoded (percent-escapes, HTML entities,
    base64, hex), holds a run of DETECT characters of one of ``secrets``."""
    grams: set[str] = set()
    for secret in secrets:
        if secret and len(secret) >= SHORTEST:
            folded = secret.casefold()
            grams.update(folded[i : i + DETECT] for i in range(max(1, len(folded) - DETECT + 1)))
    if not grams or not text:
        return False
    for view in _decoded(text[: WINDOW * 2]):
        folded = view.casefold()
        if any(folded[i : i + DETECT] in grams for i in range(len(folded) - DETECT + 1)):
            return True
        if any(gram in folded for gram in grams if len(gram) < DETECT):
            return True
    return False
