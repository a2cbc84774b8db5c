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
from collections.abc import Callable, Iterator
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


def broker_transport() -> str:
    """The kind of the test broker's kombu transport: "redis", "amqp" (RabbitMQ), ..."""
    from project.celery import app

    with app.connection_for_read() as broker:  # no connecting: the URL tells
        return str(broker.transport.driver_type)


def broker_count(queue: str) -> int:
    """How many messages wait in ``queue`` on the test broker, on any kombu transport (0 when
    the queue was never declared). Messages a consumer holds unacknowledged are not counted."""
    from project.celery import app

    with app.connection_for_read() as broker:
        channel = broker.channel()
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except broker.channel_errors:  # AMQP: 404 NOT_FOUND (and the channel is closed)
            return 0
        finally:
            with contextlib.suppress(Exception):
                channel.close()


def broker_messages(queue: str) -> list[dict[str, Any]]:
    """The messages waiting in ``queue`` on the test broker, oldest first, left where they are:
    each a dict with the task's ``args`` and the message's ``headers``.

    On Redis it reads the list; on other transports (RabbitMQ) it takes every message without
    acknowledging it, then rejects each with requeue, in order: RabbitMQ puts a requeued message
    back in its place, so the queue is left as it was (but for the messages' redelivered flag).
    Call it while no worker consumes ``queue``."""
    if broker_transport() == "redis":
        return [
            {"args": body[0], "headers": headers}
            for headers, body, _raw in _redis_broker_messages(queue)
        ]
    return [{"args": body[0], "headers": headers} for headers, body, _raw in _peek(queue)]


def _redis_broker_messages(queue: str) -> list[tuple[dict[str, Any], Any, str]]:
    import base64
    import json

    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        messages = []
        for raw in reversed(client.lrange(queue, 0, -1)):  # kombu pushes on the left
            message = json.loads(raw)
            body = json.loads(base64.b64decode(message["body"]))
            messages.append((message["headers"], body, raw.decode(errors="replace")))
        return messages
    finally:
        client.close()


def _peek(queue: str) -> list[tuple[dict[str, Any], Any, str]]:
    """(headers, decoded body, everything of the message as text) of each message in
    ``queue``, oldest first, through kombu; every message is requeued in place."""
    from kombu import Queue

    from project.celery import app

    found: list[tuple[dict[str, Any], Any, str]] = []
    with app.connection_for_read() as broker:
        channel = broker.channel()
        taken = []
        try:
            bound = Queue(queue, no_declare=True)(channel)
            while True:
                try:
                    message = bound.get(no_ack=False, accept=["json"])
                except broker.channel_errors:  # AMQP: no such queue (404 NOT_FOUND)
                    break
                if message is None:
                    break
                taken.append(message)
                raw = message.body if isinstance(message.body, str) else message.body.decode()
                text = f"{message.headers!r}{message.properties!r}{raw}"
                found.append((dict(message.headers), message.decode(), text))
        finally:
            try:
                for message in taken:  # in order: each goes back to its place
                    message.reject(requeue=True)
            finally:
                with contextlib.suppress(Exception):  # closed by the broker on a channel error
                    channel.close()  # (what was not rejected is requeued as its channel closes)
    return found


def broker_dump(queues: str = ALL_QUEUES) -> list[str]:
    """Everything the test broker holds, as text, for leak scans: on Redis every key and value
    of its database (queues, unacknowledged messages, bindings); on other transports (RabbitMQ)
    every message waiting in ``queues`` (headers, properties, body), left in place."""
    if broker_transport() == "redis":
        from django.conf import settings

        return list(redis_dump(settings.CELERY_BROKER_URL))
    return [text for queue in queues.split(",") for _h, _b, text in _peek(queue)]


def redis_dump(url: str) -> Iterator[str]:
    """Every key of the Redis database at ``url`` and every value in it, as text."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key).decode()
            yield key.decode(errors="replace")
            if kind == "string":
                yield (client.get(key) or b"").decode(errors="replace")
            elif kind == "list":
                yield from (item.decode(errors="replace") for item in client.lrange(key, 0, -1))
            elif kind == "hash":
                yield from (f"{k!r}{v!r}" for k, v in client.hgetall(key).items())
            elif kind == "set":
                yield from (item.decode(errors="replace") for item in client.smembers(key))
            elif kind == "zset":
                yield from (item.decode(errors="replace") for item in client.zrange(key, 0, -1))
    finally:
        client.close()
