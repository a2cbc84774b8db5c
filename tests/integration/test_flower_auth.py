"""Flower shows every task to whoever reaches its port: the Procfile's and compose's launcher
refuses to start it without authentication."""

from __future__ import annotations

import subprocess
import sys

import pytest

from project.embedded_redis import free_port
from tests.processes import ROOT, child_env

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("auth", "fragment"),
    [
        (None, "FLOWER_BASIC_AUTH is not set"),
        ("", "FLOWER_BASIC_AUTH is not set"),
        ("admin", "must be user:password"),
        (":long-enough-password", "must be user:password"),
        ("admin:change-me", "placeholder or shorter than 12"),
        ("admin:short", "placeholder or shorter than 12"),
    ],
)
def test_flower__refuses_to_start_without_real_auth(auth: str | None, fragment: str) -> None:
    env = child_env()
    env.pop("FLOWER_BASIC_AUTH", None)
    env.pop("FLOWER_AUTH", None)
    if auth is not None:
        env["FLOWER_BASIC_AUTH"] = auth
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "project.flower", "--address=127.0.0.1", f"--port={port}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "flower: refusing to start" in result.stderr and fragment in result.stderr
