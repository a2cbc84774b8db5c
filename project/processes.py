"""Stopping a child process the one way the dev run, the tests and the benchmark all do it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def stop(
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    *,
    timeout: float = 10.0,
    group: bool = False,
) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. With ``group``, signal the
    process's whole group (it was started with ``start_new_session``), and SIGKILL what is left
    of the group even when the leader exited (a worker's pool children)."""

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, signum)
            else:
                process.send_signal(signum)

    if process.poll() is None:
        send(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            process.wait(10)
    if group:
        send(signal.SIGKILL)
