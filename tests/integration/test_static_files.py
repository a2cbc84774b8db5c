"""Static files in production: collectstatic, then gunicorn with DJANGO_DEBUG off serves the
admin's and tokens' files (WhiteNoise) under hashed names, cached for good, gzipped on request."""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from project.embedded_redis import free_port
from tests.processes import BIN, ROOT, Process, child_env, wait_for

pytestmark = pytest.mark.integration

TOKENS_CSS = ROOT / "tokens" / "static" / "tokens" / "admin.css"
# WhiteNoise's headers for a file whose name carries its hash (ten years, never revalidated).
FOREVER = 315360000


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


def get(url: str, **headers: str) -> Response:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Response(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Response(error.code, dict(error.headers), error.read())


def max_age(cache_control: str) -> int:
    found = re.search(r"max-age=(\d+)", cache_control)
    return int(found.group(1)) if found else 0


def production_env(static_root: Path) -> dict[str, str]:
    """The test run's Redis, database and encryption keys; production's DEBUG and SECRET_KEY."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return child_env(
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(48),  # 64 characters
        DJANGO_STATIC_ROOT=str(static_root),
        PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)),
    )


@pytest.fixture(scope="module")
def static_root(tmp_path_factory: pytest.TempPathFactory, django_db_setup: None) -> Path:
    root = tmp_path_factory.mktemp("static")
    result = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--no-input", "-v", "1"],
        cwd=ROOT,
        env=production_env(root),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "staticfiles.json").is_file(), result.stdout
    return root


@pytest.fixture(scope="module")
def gunicorn(
    static_root: Path, tmp_path_factory: pytest.TempPathFactory, django_db_setup: None
) -> Iterator[str]:
    """The base URL of ``gunicorn project.wsgi:application`` (DJANGO_DEBUG off)."""
    port = free_port()
    server = Process(
        "gunicorn",
        [
            str(BIN / "gunicorn"),
            "project.wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
        ],
        tmp_path_factory.mktemp("gunicorn") / "gunicorn.log",
        production_env(static_root),
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if not server.alive():
                raise AssertionError(f"gunicorn exited early:\n{server.log()[-3000:]}")
            try:
                return get(f"{base}/admin/login/").status == 200
            except OSError:
                return False

        wait_for(ready, 60, interval=0.2, message="gunicorn to serve the admin login page")
        yield base
    finally:
        server.stop()
        assert not server.alive()


def test_admin_css__hashed_name_long_cache_and_gzip(gunicorn: str) -> None:
    page = get(f"{gunicorn}/admin/login/")
    assert page.status == 200
    link = re.search(rb'href="(/static/admin/css/base\.[0-9a-f]{12}\.css)"', page.body)
    assert link, page.body.decode(errors="replace")
    url = gunicorn + link.group(1).decode()

    plain = get(url)
    assert plain.status == 200
    assert plain.headers["Content-Type"].startswith("text/css")
    assert max_age(plain.headers["Cache-Control"]) == FOREVER
    assert "immutable" in plain.headers["Cache-Control"]
    assert "Content-Encoding" not in plain.headers
    assert b"body" in plain.body

    gzipped = get(url, **{"Accept-Encoding": "gzip"})
    assert gzipped.status == 200
    assert gzipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in gzipped.headers.get("Vary", "")
    assert max_age(gzipped.headers["Cache-Control"]) == FOREVER
    assert len(gzipped.body) < len(plain.body)
    assert gzip.decompress(gzipped.body) == plain.body


def test_tokens_css__served_under_its_hashed_name_from_the_manifest(
    gunicorn: str, static_root: Path
) -> None:
    manifest = json.loads((static_root / "staticfiles.json").read_text())
    hashed = manifest["paths"]["tokens/admin.css"]
    assert re.fullmatch(r"tokens/admin\.[0-9a-f]{12}\.css", hashed), hashed

    response = get(f"{gunicorn}/static/{hashed}")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/css")
    assert max_age(response.headers["Cache-Control"]) == FOREVER
    assert "immutable" in response.headers["Cache-Control"]
    assert response.body == TOKENS_CSS.read_bytes()

    # The plain name is served too, but may change under it: no long cache.
    plain = get(f"{gunicorn}/static/tokens/admin.css")
    assert plain.status == 200
    assert plain.body == response.body
    assert max_age(plain.headers.get("Cache-Control", "")) < FOREVER
    assert "immutable" not in plain.headers.get("Cache-Control", "")
