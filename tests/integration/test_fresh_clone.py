"""The README's two commands, in the README's order, in a fresh clone: `python3 dev.py run` (it
creates the virtualenv and installs what the stack needs), Ctrl-C, then `python3 dev.py test`
(it installs what the tests need on top, then runs them)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from project.embedded_redis import free_port
from tests.integration.test_dev_run import UNSET, http_status
from tests.processes import ROOT, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.install]


def test_fresh_clone__run_then_test(tmp_path: Path) -> None:
    python = shutil.which("python3")
    assert python, "python3 must be on PATH"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    for key in ("TOKENS_VENV", "DEV_STATE_DIR", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(key, None)
    web_port, flower_port = free_port(), free_port()
    env.update(DEV_WEB_PORT=str(web_port), DEV_FLOWER_PORT=str(flower_port))
    log = (tmp_path / "run.log").open("wb")
    run = subprocess.Popen(
        [python, "dev.py", "run"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: http_status(f"http://127.0.0.1:{web_port}/admin/login/") == 200,
            480,
            interval=1.0,
            message="the dev run's admin login page (after installing into a new virtualenv)",
        )
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C
        assert run.wait(60) in (0, 130), (tmp_path / "run.log").read_text()[-3000:]
        assert "dev: stopped" in (tmp_path / "run.log").read_text()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        log.close()
    tested = subprocess.run(
        [python, "dev.py", "test", "-q", "-p", "no:randomly", "tests/test_dev_entry.py"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = tested.stdout + tested.stderr
    assert tested.returncode == 0, output[-3000:]
    assert "installing the project (.[dev])" in output  # what `run` did not need
    assert " passed" in output and "No module named" not in output
