"""The README's run command brings up the whole stack and Ctrl-C leaves no process behind;
``dev.py manage`` runs commands beside it, on its database and Redis."""

from __future__ import annotations

import http.cookiejar
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import urlencode

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


def stack_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a terminal with none of UNSET, the dev state under ``tmp_path``."""
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    env.update(DEV_STATE_DIR=str(tmp_path / "state"), **extra)
    return env


def start_stack(
    tmp_path: Path, output: IO[bytes] | int, **extra: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start ``python -m project.devstack run`` (what dev.py runs) in its own process group."""
    web_port, flower_port = free_port(), free_port()
    stack = subprocess.Popen(
        [sys.executable, "-m", "project.devstack", "run"],
        cwd=ROOT,
        env=stack_env(
            tmp_path, DEV_WEB_PORT=str(web_port), DEV_FLOWER_PORT=str(flower_port), **extra
        ),
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


def ctrl_c(stack: subprocess.Popen[bytes]) -> None:
    os.killpg(stack.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    try:
        stack.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(stack.pid, signal.SIGKILL)
        raise


def manage(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python3 dev.py manage <args>`` in a second terminal (dev.py execs this)."""
    return subprocess.run(
        [sys.executable, "-m", "project.devstack", "manage", *args],
        cwd=ROOT,
        env=stack_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def admin_login(base: str, username: str, password: str) -> tuple[int, str]:
    """Log in on the admin's form (CSRF cookie and token as a browser sends them); return the
    status of the POST and where it redirects to."""
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect()
    )
    url = f"{base}/admin/login/?next=/admin/"
    with opener.open(url, timeout=5) as response:
        form = response.read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert csrf, form
    data = urlencode(
        {
            "csrfmiddlewaretoken": csrf.group(1),
            "username": username,
            "password": password,
            "next": "/admin/",
        }
    ).encode()
    try:
        with opener.open(urllib.request.Request(url, data=data), timeout=5) as response:
            return int(response.status), ""
    except urllib.error.HTTPError as error:
        return int(error.code), error.headers.get("Location", "")


@contextmanager
def stopped_at_the_end(stack: subprocess.Popen[bytes]) -> Iterator[None]:
    try:
        yield
    finally:
        if stack.poll() is None:
            ctrl_c(stack)


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
    redis_url_file = tmp_path / "state" / "redis.url"
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
        # where ``dev.py manage`` in another terminal finds this Redis
        assert redis_url_file.read_text().strip() == broker.group(1)
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
        ctrl_c(stack)
    assert left_behind(children) == []
    assert "dev: stopped" in log_path.read_text()
    assert not redis_url_file.exists()


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


def test_manage_beside_the_run__and_the_admin_password_from_the_environment(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    old_password, new_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    # An admin user from before (an earlier run's), made with the run's database but no run.
    migrated = manage(tmp_path, "migrate", "--no-input", "-v", "0")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "the dev run is not running" in migrated.stderr
    created = manage(
        tmp_path,
        "createsuperuser",
        "--no-input",
        DJANGO_SUPERUSER_USERNAME="admin",
        DJANGO_SUPERUSER_EMAIL="admin@example.com",
        DJANGO_SUPERUSER_PASSWORD=old_password,
    )
    assert created.returncode == 0, created.stdout + created.stderr

    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        stack, web_port, _ = start_stack(tmp_path, log, DJANGO_SUPERUSER_PASSWORD=new_password)
    with stopped_at_the_end(stack):
        # The run set the existing admin's password from DJANGO_SUPERUSER_PASSWORD.
        output = log_path.read_text()
        assert "admin user 'admin': password set from DJANGO_SUPERUSER_PASSWORD" in output
        assert new_password not in output
        base = f"http://127.0.0.1:{web_port}"
        assert admin_login(base, "admin", new_password) == (302, "/admin/")
        assert admin_login(base, "admin", old_password)[0] == 200  # the form again

        broker = re.search(r"embedded Redis on (redis://\S+)", output)
        assert broker, output
        assert (state / "redis.url").read_text().strip() == broker.group(1)

        # A second terminal: the run's database, encryption keys and Redis. The refresh that
        # saving the provider sends goes through the run's broker to the run's worker.
        made = manage(
            tmp_path,
            "shell",
            "-c",
            "import time\n"
            "from datetime import timedelta\n"
            "from tokens.models import Provider, Token\n"
            "p = Provider.objects.create(name='payments', kind='static', secret='pay-tok-1',"
            " refresh_interval=timedelta(hours=1))\n"
            "deadline = time.monotonic() + 30\n"
            "while not Token.objects.filter(provider=p).exists() and time.monotonic() < deadline:\n"
            "    time.sleep(0.1)\n"
            "print(max(Token.objects.filter(provider=p).values_list('version', flat=True),"
            " default=0))\n",
        )
        assert made.returncode == 0, made.stdout + made.stderr
        by_the_worker = int(made.stdout.split()[-1])
        assert by_the_worker > 0, "the run's worker did not refresh the new provider"

        refreshed = manage(tmp_path, "refresh_token", "payments", "--show")
        assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
        assert "not running" not in refreshed.stderr
        summary, shown = refreshed.stdout.splitlines()
        found = re.fullmatch(r"payments: version (\d+), fingerprint \S+, expires \S+", summary)
        assert found, summary
        assert int(found.group(1)) > by_the_worker
        assert shown == "pay-tok-1"
        # The console: one line for that refresh, not Celery's pair besides.
        console = log_path.read_text()
        assert "refresh stored provider=payments" in console
        assert "Task tokens.refresh_token[" not in console

        ctrl_c(stack)
    assert "dev: stopped" in log_path.read_text()
    assert not (state / "redis.url").exists()
