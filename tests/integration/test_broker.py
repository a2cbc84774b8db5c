"""The test helpers that read the broker work on whichever one the suite runs on (Redis, or
RabbitMQ when CELERY_BROKER_URL says amqp://): CI runs this module on both."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings

from project.celery import app
from tests.integration.events import EventLog
from tests.processes import (
    broker_count,
    broker_dump,
    broker_messages,
    broker_transport,
    purge_queues,
    wait_for,
)

pytestmark = pytest.mark.integration

QUEUE = "tokens.scheduled"


@pytest.fixture
def queues() -> Iterator[None]:
    """Empty queues before, and nothing left for a later test's worker after."""
    purge_queues()
    yield
    purge_queues()


def send(marker: str, number: int) -> None:
    app.send_task(
        "tokens.refresh_batch",
        args=([number],),
        headers={"test-marker": marker},
        queue=QUEUE,
        expires=120,
    )


def test_broker__is_the_one_asked_for_and_answers() -> None:
    """A broker given in the environment is the one the suite uses, and it is reachable: a CI
    step meant for RabbitMQ never passes on something else, nor skips what it cannot reach."""
    wanted = os.environ.get("CELERY_BROKER_URL")
    if wanted:
        assert wanted == settings.CELERY_BROKER_URL
        assert broker_transport() == ("amqp" if wanted.startswith("amqp") else "redis")
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=3, interval_start=1, timeout=5)


@pytest.mark.usefixtures("queues")
def test_broker_messages__reads_every_message_in_order_and_leaves_them() -> None:
    marker = uuid.uuid4().hex
    for number in range(5):
        send(marker, number)
    wait_for(lambda: broker_count(QUEUE) == 5, 5, message="five messages in the queue")

    first = broker_messages(QUEUE)
    assert [message["args"] for message in first] == [[[n]] for n in range(5)]
    assert all(message["headers"]["test-marker"] == marker for message in first)
    assert all(message["headers"]["task"] == "tokens.refresh_batch" for message in first)
    assert all(message["headers"]["expires"] for message in first)
    assert broker_messages(QUEUE) == first  # nothing lost, nothing reordered
    assert broker_count(QUEUE) == 5


def test_broker_helpers__a_queue_never_declared_is_empty() -> None:
    name = f"tokens.test-never-declared-{uuid.uuid4().hex}"
    assert broker_count(name) == 0
    assert broker_messages(name) == []


@pytest.mark.usefixtures("queues")
def test_broker_dump__shows_what_waits_in_the_broker() -> None:
    marker = uuid.uuid4().hex
    send(marker, 7)
    wait_for(lambda: broker_count(QUEUE) == 1, 5, message="the message in the queue")
    assert marker in "\n".join(broker_dump())
    assert broker_count(QUEUE) == 1  # left in place


def test_event_log__receives_the_events_sent_once_it_is_entered() -> None:
    marker = uuid.uuid4().hex
    with EventLog() as log, app.events.default_dispatcher() as dispatcher:
        dispatcher.send("task-sent", uuid=marker, name="tokens.refresh_token")
        wait_for(
            lambda: any(event.get("uuid") == marker for event in log.events),
            5,
            message="the event to come back",
        )
    assert all(event["type"] != "tokens-test-event-log-probe" for event in log.events)
