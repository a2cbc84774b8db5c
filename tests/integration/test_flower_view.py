"""What Flower shows of a refresh: a readable task name, the provider id as the only argument,
an empty result."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer

from tests.factories import make_provider, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.integration.events import EventLog
from tests.processes import Process, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_events__name_args_and_result_of_a_refresh(worker: Process, httpserver: HTTPServer) -> None:
    endpoint = TokenEndpoint(httpserver)
    with EventLog() as events:
        provider = make_provider(config=oauth2_config(endpoint.url))
        wait_for(
            lambda: any(e["type"] == "task-succeeded" for e in events.events),
            10,
            message="the refresh's events",
        )
    received = [e for e in events.events if e["type"] == "task-received"]
    succeeded = [e for e in events.events if e["type"] == "task-succeeded"]
    assert received and succeeded
    assert received[0]["name"] == "tokens.refresh_token"
    assert received[0]["args"] == f"({provider.pk},)"
    assert received[0]["kwargs"] == "{}"
    assert succeeded[0]["result"] == "None"


def test_flower_config_tab__shows_no_credential_in_any_url(tmp_path, django_db_setup: None) -> None:
    """Flower's Config tab is the workers' ``inspect conf``: Celery masks the broker's URL and
    keys named like secrets, not REDIS_URL or a cache's LOCATION; the project's own ``conf``
    command masks credentials in every URL."""
    import json

    from django.conf import settings

    from project.celery import app
    from tests.processes import start_worker

    # Redis's default user takes any password while none is set: a URL with one still works.
    with_password = settings.REDIS_URL.replace("redis://", "redis://default:hunter2-flower@", 1)
    process = start_worker(tmp_path, hostname="conf", REDIS_URL=with_password)
    try:
        replies = app.control.inspect(timeout=5).conf() or {}
    finally:
        process.stop()
    answers = [reply for name, reply in replies.items() if name.startswith("conf@")]
    assert len(answers) == 1, list(replies)
    assert answers[0]["REDIS_URL"].startswith("redis://default:**@")
    assert answers[0]["CACHES"]["default"]["LOCATION"].startswith("redis://default:**@")
    assert "hunter2-flower" not in json.dumps(answers[0])
