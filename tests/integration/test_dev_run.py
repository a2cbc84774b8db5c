"""The README's run command brings up the whole stack and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import IO

import psutil
import pytest
from celery import Celery

from project.embedded_redis import free_port
from tests.processes import ROOT, wait_for

pytestmark = pytest.mark.integration

# The run command must work on a machine where none of these is set.
UNSET = {
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "DATABASE_URL",
    "DJANGO_SECRET_KEY",
    "TOKENS_ENCRYPTION_KEYS",
    "FLOWER_BASIC_AUTH",
}


def http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def start_stack(
    tmp_path: Path, output: IO[bytes] | int
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start ``python -m project.devstack run`` (what dev.py runs) in its own process group."""
    web_port, flower_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    env.update(
        DEV_STATE_DIR=str(tmp_path / "state"),
        DEV_WEB_PORT=str(web_port),
        DEV_FLOWER_PORT=str(flower_port),
    )
    stack = subprocess.Popen(
        [sys.executable, "-m", "project.devstack", "run"],
        cwd=ROOT,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(
        lambda: http_status(f"http://127.0.0.1:{web_port}/admin/login/") == 200,
        90,
        interval=0.3,
        message="the admin login page",
    )
    return stack, web_port, flower_port


def left_behind(children: list[psutil.Process]) -> list[list[str]]:
    time.sleep(0.5)
    return [
        child.cmdline()
        for child in children
        if child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    ]


def test_run__starts_web_worker_beat_flower_and_sigint_stops_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        stack, _, flower_port = start_stack(tmp_path, log)
    children: list[psutil.Process] = []
    try:
        dev_env = dict(
            line.split("=", 1) for line in (tmp_path / "state" / "dev.env").read_text().split()
        )
        flower = f"http://127.0.0.1:{flower_port}/"
        wait_for(lambda: http_status(flower) == 401, 30, interval=0.3, message="Flower")
        assert http_status(flower, "admin:wrong") == 401
        assert http_status(flower, dev_env["FLOWER_BASIC_AUTH"]) == 200

        output = log_path.read_text()
        assert "created admin user 'admin' with password" in output
        broker = re.search(r"embedded Redis on (redis://\S+)", output)
        assert broker, output
        # CELERY_BROKER_URL in this process's environment would win over the broker argument
        monkeypatch.delenv("CELERY_BROKER_URL")
        client = Celery(broker=broker.group(1))
        wait_for(
            lambda: client.control.ping(timeout=0.5), 30, message="the worker to answer a ping"
        )
        wait_for(lambda: "beat: Starting" in log_path.read_text(), 30, message="beat")
        assert log_path.read_text().count("beat: Starting") == 1

        children = psutil.Process(stack.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        for expected in ("redis-server", "runserver", "worker", "beat", "flower"):
            assert expected in names
    finally:
        os.killpg(stack.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        try:
            stack.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)
            raise
    assert left_behind(children) == []
    assert "dev: stopped" in log_path.read_text()


def test_run__sigterm_stops_everything_too(tmp_path: Path) -> None:
    stack, _, _ = start_stack(tmp_path, subprocess.DEVNULL)
    try:
        children = psutil.Process(stack.pid).children(recursive=True)
        stack.terminate()  # SIGTERM to the run command only, as a service manager would
        stack.wait(30)
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
    assert left_behind(children) == []
