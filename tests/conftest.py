from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings
from hypothesis import settings as hypothesis_settings
from pytest_httpserver import HTTPServer

from tests.processes import Process, purge_queues, start_beat, start_worker
from tokens import memory


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    """The real Redis the suite runs on (embedded, or REDIS_URL), on the cache's database."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _flush_redis(redis_client: redis.Redis) -> None:
    """Every test starts with an empty cache database (the broker lives on another one) and
    an empty per-process token memory."""

    redis_client.flushdb()
    memory.memory.clear()


@pytest.fixture
def empty_queues() -> None:
    """For tests that send without a worker running: what they send stays in the broker (where
    they may read it), emptied first so that nothing of theirs reaches a later test's worker."""
    purge_queues()


@pytest.fixture(scope="session")
def make_httpserver() -> Iterator[HTTPServer]:
    """pytest-httpserver's server, threaded: a stalled request must not hold up the others."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture(scope="module")
def worker(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A real ``celery worker`` process on the test Redis and the test database, for a module.

    Tests that use it must also use ``transactional_db`` so the worker sees their rows. Tests
    of other modules run with no worker consuming their messages.
    """

    purge_queues()
    worker = start_worker(tmp_path_factory.mktemp("worker"))
    yield worker
    worker.stop()


@pytest.fixture
def beat(tmp_path: Path, django_db_setup: None) -> Iterator[Callable[..., Process]]:
    """Start real ``celery beat`` processes; each is stopped when the test ends."""
    started: list[Process] = []

    def start(**kwargs: object) -> Process:
        process = start_beat(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def worker_factory(tmp_path: Path, django_db_setup: None) -> Iterator[Callable[..., Process]]:
    """Start extra real worker processes (own hostnames/queues); stopped when the test ends."""
    started: list[Process] = []

    def start(**kwargs: object) -> Process:
        process = start_worker(tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(process)
        return process

    start.started = started  # type: ignore[attr-defined]
    yield start
    for process in started:
        process.stop()


# CI explores the same examples every run (a red build must be reproducible); locally, new ones.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def _close_stray_connections(django_db_setup: None, django_db_blocker: object) -> Iterator[None]:
    """Before pytest-django drops the PostgreSQL test database, end the sessions that threads of
    this process left open (a thread's connection closes only with the thread)."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:  # type: ignore[attr-defined]
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
