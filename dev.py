#!/usr/bin/env python3
"""The project's entry point on a machine with only Python 3.11+.

    python3 dev.py run     the whole stack: web, worker, beat, Flower (+ an embedded Redis)
    python3 dev.py test    the whole test suite (extra arguments go to pytest)
    python3 dev.py manage  a manage.py command beside the dev run (same database and Redis)
    python3 dev.py lint    ruff, mypy and import-linter
    python3 dev.py bench   the benchmarks

It creates ./.venv when missing, installs the project into it when pyproject.toml changed, then
hands over to ``project.devstack`` inside that virtualenv. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("TOKENS_VENV", ROOT / ".venv"))
COMMANDS = {"run": "stack", "manage": "stack", "test": "dev", "lint": "dev", "bench": "dev"}


def install_stamps(digest: str, extra: str) -> tuple[list[Path], Path]:
    """The stamps that show what ``extra`` needs is installed, and the one to leave after
    installing it: "dev" (tests, linters) includes "stack" (the dev run), not the other way
    round."""
    installed = VENV / f".tokens-installed-{digest}-{extra or 'runtime'}"
    enough = [VENV / f".tokens-installed-{digest}-dev"]
    if extra != "dev":
        enough.append(installed)
    return enough, installed


def ensure_venv(extra: str) -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"dev: creating virtualenv {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamps, installed = install_stamps(digest, extra)
    if not any(stamp.exists() for stamp in stamps):
        target = f".[{extra}]" if extra else "."
        print(f"dev: installing the project ({target}) into {VENV}", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True
        )
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-e", target], cwd=ROOT, check=True
        )
        for old in VENV.glob(".tokens-installed-*"):
            old.unlink()
        installed.touch()
    return python


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 11):
        sys.exit("dev: Python 3.11 or newer is needed")
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    python = ensure_venv(COMMANDS[argv[0]])
    os.chdir(ROOT)
    os.execv(str(python), [str(python), "-m", "project.devstack", *argv])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
