"""Start Flower only behind authentication: ``python -m project.flower [flower options]``.

Flower serves every task's name, arguments and timing to whoever reaches its port, and without
``FLOWER_BASIC_AUTH`` (or Flower's OAuth, ``FLOWER_AUTH``) it asks nobody. This launcher refuses
to start it that way, or with the placeholder password of .env.example, then hands over to
``celery -A project flower`` with the given options.
"""

from __future__ import annotations

import os
import shutil
import sys

PLACEHOLDERS = {"change-me", "changeme", "password", "admin", "flower"}
SHORTEST_PASSWORD = 12


def auth_problem(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Why Flower may not start with this environment, or None."""
    if environ.get("FLOWER_AUTH") and environ.get("FLOWER_AUTH_PROVIDER"):
        return None  # Flower's own OAuth login
    basic = environ.get("FLOWER_BASIC_AUTH", "").strip()
    if not basic:
        return (
            "FLOWER_BASIC_AUTH is not set: Flower would show every task to anyone who reaches "
            "its port. Set it to user:password (or configure Flower's OAuth: FLOWER_AUTH and "
            "FLOWER_AUTH_PROVIDER)."
        )
    for pair in basic.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            return "FLOWER_BASIC_AUTH must be user:password (comma-separated for several)"
        if password.lower() in PLACEHOLDERS or len(password) < SHORTEST_PASSWORD:
            return (
                f"FLOWER_BASIC_AUTH: the password of {user.strip()!r} is a placeholder or "
                f"shorter than {SHORTEST_PASSWORD} characters"
            )
    return None


def main(argv: list[str]) -> int:
    problem = auth_problem(os.environ)
    if problem:
        print(f"flower: refusing to start: {problem}", file=sys.stderr, flush=True)
        return 2
    celery = shutil.which("celery") or os.path.join(os.path.dirname(sys.executable), "celery")
    os.execv(celery, [celery, "-A", "project", "flower", *argv])  # noqa: S606 - fixed program
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
