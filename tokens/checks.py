"""Start-up refuses what cannot work: tokens' Django system check, also run when a Celery worker
or beat starts and when the project's WSGI/ASGI application loads.

- TOKENS_ENCRYPTION_KEYS holds valid Fernet keys (no keys: never plaintext);
- with DEBUG off, SECRET_KEY is not empty, short or Django's insecure default (tokens' display
  fingerprints are keyed with it);
- the keys open the stored secrets and tokens: keys that open none of them are the wrong keys
  (the service would start, then fail on every use).
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError

from tokens import crypto, selectors

logger = logging.getLogger(__name__)

# Django's own measure of a weak SECRET_KEY (security.W009), refused rather than warned of.
SECRET_KEY_MIN_LENGTH = 50
SECRET_KEY_MIN_UNIQUE = 5
SAMPLE = 20


def secret_key_problem() -> str | None:
    if settings.DEBUG:
        return None
    key = str(getattr(settings, "SECRET_KEY", "") or "")
    if (
        len(key) < SECRET_KEY_MIN_LENGTH
        or len(set(key)) < SECRET_KEY_MIN_UNIQUE
        or key.startswith("django-insecure-")
    ):
        return (
            f"SECRET_KEY (DJANGO_SECRET_KEY) is empty, shorter than {SECRET_KEY_MIN_LENGTH} "
            "characters or a placeholder, with DEBUG off: tokens keys its fingerprints with "
            "it. Generate one: python -c "
            '"import secrets; print(secrets.token_urlsafe(50))"'
        )
    return None


def stored_rows_problem() -> str | None:
    """Whether the keys open the stored ciphertexts: a sample of the secrets and tokens."""
    try:
        samples = [raw for _, raw in selectors.stored_ciphertexts(limit=SAMPLE)]
    except DatabaseError:
        return None  # no tables yet (before migrate), or no database: nothing stored to check
    if not samples:
        return None
    opened = sum(crypto.opens(raw) for raw in samples)
    if opened == 0:
        return (
            f"TOKENS_ENCRYPTION_KEYS opens none of the {len(samples)} stored secrets and tokens "
            f"sampled (keys in use: {', '.join(crypto.key_fingerprints())}): these are not the "
            "keys they were encrypted with. Put the right key back (first, or after a new one "
            "while rotating)."
        )
    if opened < len(samples):
        logger.warning(
            "tokens: %s of %s stored secrets and tokens sampled do not open with "
            "TOKENS_ENCRYPTION_KEYS (a key they need was removed?)",
            len(samples) - opened,
            len(samples),
        )
    return None


def problems() -> list[str]:
    found: list[str] = []
    try:
        crypto.check_keys()
    except ImproperlyConfigured as error:
        found.append(str(error))
        return found
    for problem in (secret_key_problem(), stored_rows_problem()):
        if problem:
            found.append(problem)
    return found


@checks.register("tokens")
def check_startup(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """tokens' system check: run by runserver, migrate, check and most commands."""
    return [checks.Error(problem, id=f"tokens.E00{n}") for n, problem in enumerate(problems(), 1)]


def refuse_to_start() -> None:
    """Exit with the problems when there are any (worker, beat, WSGI/ASGI start)."""
    found = problems()
    if found:
        raise SystemExit("tokens: refusing to start:\n- " + "\n- ".join(found))


def on_process_start(**kwargs: Any) -> None:
    """Receiver of Celery's worker_init and beat_init signals."""
    refuse_to_start()
