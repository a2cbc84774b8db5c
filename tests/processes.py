"""Real processes for integration tests: Celery workers, beat, and Django scripts.

Each child gets the environment of the test run with DATABASE_URL pointing at the test database,
logs to a file under the test's tmp dir, and is stopped (or killed) by the fixture that made it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from django.db import connection

from project import processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Every queue the project's tasks go to: Celery's default and tokens' two lanes.
ALL_QUEUES = "celery,tokens.urgent,tokens.scheduled"


def purge_queues(queues: str = ALL_QUEUES) -> None:
    """Drop every message waiting in ``queues`` (left over by earlier tests)."""
    from project.celery import app

    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for queue in queues.split(","):
            with contextlib.suppress(Exception):
                channel.queue_purge(queue)


def child_database_url() -> str:
    """DATABASE_URL of the test database that pytest-django created (for child processes)."""
    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{Path(s['NAME']).resolve()}"
    user = quote(s.get("USER") or "")
    password = f":{quote(s['PASSWORD'])}" if s.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    host = s.get("HOST") or "127.0.0.1"
    port = f":{s['PORT']}" if s.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{s['NAME']}"


def child_env(**overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": child_database_url(),
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.update(overrides)
    return env


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns a truthy value; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Process:
    """A child process with its output in ``log_path``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self._log = open(log_path, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        processes.stop(self.popen, timeout=timeout, group=True)
        self._log.close()

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)
        self.popen.wait(10)

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)


def start_worker(
    tmp_path: Path,
    *,
    hostname: str = "w1",
    queues: str = ALL_QUEUES,
    concurrency: int = 4,
    pool: str = "threads",
    loglevel: str = "INFO",
    timeout: float = 30.0,
    **env: str,
) -> Process:
    """Start ``celery worker`` and return once it answers a ping."""
    from project.celery import app

    full_hostname = f"{hostname}@{os.uname().nodename}-{os.getpid()}"
    worker = Process(
        f"worker {hostname}",
        [
            str(BIN / "celery"),
            "-A",
            "project",
            "worker",
            f"--loglevel={loglevel}",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={full_hostname}",
            f"--queues={queues}",
            "--without-gossip",
            "--without-mingle",
            "--events",
        ],
        tmp_path / f"worker-{hostname}.log",
        child_env(**env),
    )

    own_broker = "CELERY_BROKER_URL" in env  # this process's app cannot reach that broker

    def ready() -> bool:
        if not worker.alive():
            raise AssertionError(f"worker exited early:\n{worker.log()[-3000:]}")
        if own_broker:
            return f"{full_hostname} ready." in worker.log()
        return bool(app.control.ping(destination=[full_hostname], timeout=0.3))

    wait_for(ready, timeout, message=f"worker {full_hostname} to answer a ping")
    return worker


def start_beat(
    tmp_path: Path, *, name: str = "beat", max_interval: int = 1, timeout: float = 30.0, **env: str
) -> Process:
    """Start ``celery beat`` (DatabaseScheduler), re-reading the schedule every ``max_interval``."""
    beat = Process(
        name,
        [
            str(BIN / "celery"),
            "-A",
            "project",
            "beat",
            "--loglevel=DEBUG",
            f"--max-interval={max_interval}",
            f"--pidfile={tmp_path / (name + '.pid')}",
            f"--schedule={tmp_path / (name + '-schedule')}",
        ],
        tmp_path / f"{name}.log",
        child_env(**env),
    )

    def ready() -> bool:
        if not beat.alive():
            raise AssertionError(f"beat exited early:\n{beat.log()[-3000:]}")
        return "beat: Starting" in beat.log()

    wait_for(ready, timeout, message="beat to start")
    return beat


def run_script(code: str, *, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` with Django set up in a new process; return its completed process."""
    prologue = (
        "import django, os\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'project.settings')\n"
        "django.setup()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prologue + code],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def broker_messages(queue: str) -> list[dict[str, Any]]:
    """The messages waiting in ``queue`` on the test broker (Redis), oldest first: each a dict
    with the task's ``args`` and the message's ``headers``."""
    import base64
    import json

    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    messages = []
    for raw in reversed(client.lrange(queue, 0, -1)):  # kombu pushes on the left
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        messages.append({"args": args, "headers": message["headers"]})
    return messages
