"""The suite's fixtures are real: a Redis server, a worker process, a beat process."""

from __future__ import annotations

import json

import pytest
import redis
from django.conf import settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from project.celery import app
from project.testing import redis_db
from tests.processes import wait_for


def test_redis__is_a_real_server_on_its_own_database(redis_client: redis.Redis) -> None:
    redis_client.set("fixture-probe", "1")
    assert redis_client.get("fixture-probe") == b"1"
    assert redis_client.info("server")["redis_version"]
    assert redis_db(settings.REDIS_URL) != redis_db(settings.CELERY_BROKER_URL)


def test_redis__is_flushed_between_tests(redis_client: redis.Redis) -> None:
    assert redis_client.get("fixture-probe") is None


@pytest.mark.integration
def test_worker__runs_a_task_sent_through_the_broker(worker, transactional_db) -> None:
    result = app.send_task("project.ping")
    assert result.get(timeout=10) == "pong"
    assert worker.alive()


@pytest.mark.integration
def test_beat__sends_a_periodic_task_that_the_worker_runs(worker, beat, transactional_db) -> None:
    every_second, _ = IntervalSchedule.objects.get_or_create(
        every=1, period=IntervalSchedule.SECONDS
    )
    PeriodicTask.objects.create(name="fixture-probe", task="project.ping", interval=every_second)
    beat_process = beat()

    wait_for(
        lambda: "Sending due task fixture-probe (project.ping)" in beat_process.log(),
        15,
        message="beat to send the task",
    )
    backend = redis.Redis.from_url(settings.CELERY_RESULT_BACKEND)

    def pong_stored() -> bool:
        for key in backend.scan_iter("celery-task-meta-*"):
            meta = json.loads(backend.get(key) or b"{}")
            if meta.get("result") == "pong" and meta.get("status") == "SUCCESS":
                return True
        return False

    wait_for(pong_stored, 15, message="the worker to store the periodic task's result")
