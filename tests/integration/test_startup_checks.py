"""Start-up refuses what cannot work: a weak SECRET_KEY with DEBUG off, and encryption keys
that open none of the stored secrets (the service would start, then fail on every use). Checked
in real processes: manage.py (runserver runs the same checks), a Celery worker, beat, and the
WSGI application."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.factories import SECRET, make_provider
from tests.processes import BIN, ROOT, child_env, run_script

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

STRONG_KEY = "k" * 20 + "-strong-enough-secret-key-for-the-check-0123456789"


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


WEAK = "SECRET_KEY (DJANGO_SECRET_KEY) is empty, shorter than 50"


@pytest.mark.parametrize(
    ("key", "refusal"),
    [
        ("", "The SECRET_KEY setting must not be empty"),  # Django's own refusal
        ("short", WEAK),
        ("django-insecure-" + "x" * 60, WEAK),
        ("ab" * 40, WEAK),
    ],
)
def test_debug_off__a_weak_secret_key_is_refused(key: str, refusal: str) -> None:
    result = manage("check", DJANGO_DEBUG="false", DJANGO_SECRET_KEY=key)
    assert result.returncode != 0
    assert refusal in result.stderr


def test_debug_on_or_a_strong_key__starts() -> None:
    assert manage("check", DJANGO_DEBUG="true", DJANGO_SECRET_KEY="short").returncode == 0
    strong = manage("check", DJANGO_DEBUG="false", DJANGO_SECRET_KEY=STRONG_KEY)
    assert strong.returncode == 0, strong.stderr


def test_keys_that_open_no_stored_secret__every_entry_point_refuses(tmp_path: Path) -> None:
    make_provider("api", kind="static", secret=SECRET)
    wrong = Fernet.generate_key().decode()
    refusal = "TOKENS_ENCRYPTION_KEYS opens none of the"

    check = manage("check", TOKENS_ENCRYPTION_KEYS=wrong)
    assert check.returncode != 0 and refusal in check.stderr

    for program in ("worker", "beat"):
        args = [str(BIN / "celery"), "-A", "project", program, "--loglevel=INFO"]
        if program == "beat":
            args.append(f"--schedule={tmp_path / 'beat-schedule'}")
        else:
            args += ["--pool=solo", "--without-gossip", "--without-mingle"]
        started = subprocess.run(
            args,
            cwd=ROOT,
            env=child_env(TOKENS_ENCRYPTION_KEYS=wrong),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert started.returncode != 0, program
        assert "tokens: refusing to start" in started.stderr + started.stdout, program
        assert refusal in started.stderr + started.stdout, program

    wsgi = run_script("import project.wsgi", TOKENS_ENCRYPTION_KEYS=wrong)
    assert wsgi.returncode != 0 and refusal in wsgi.stderr

    # The right key, second behind a new one (a rotation under way): all is well.
    old = child_env()["TOKENS_ENCRYPTION_KEYS"]
    assert manage("check", TOKENS_ENCRYPTION_KEYS=f"{wrong},{old}").returncode == 0
