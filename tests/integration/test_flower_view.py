"""What Flower shows of refreshes: a readable task name, the provider's name beside its id (a
search for the name finds every refresh of it), failed refreshes as failed tasks, and next to
no bookkeeping while nothing is due."""

from __future__ import annotations

import time

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
        provider = make_provider("payments", config=oauth2_config(endpoint.url))
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
    assert received[0]["kwargs"] == "{'provider': 'payments'}"  # what Flower's search finds
    assert succeeded[0]["result"] == "None"


def test_flower__every_refresh_names_its_provider_failures_show_failed_and_idle_is_quiet(
    worker: Process, beat, httpserver: HTTPServer
) -> None:
    """What an operator opens Flower for: a search for the provider's name finds every refresh
    of it, single or batched; a failed refresh is a failed task naming its error class; and
    while nothing is due, bookkeeping sends next to no tasks."""
    endpoint = TokenEndpoint(httpserver)
    with EventLog() as events:  # before the providers: their first refreshes are sent at once
        healthy = make_provider("payments", config=oauth2_config(endpoint.url), interval=2)
        broken = make_provider(
            "ledger", config=oauth2_config(httpserver.url_for("/nowhere")), interval=2
        )
        beat()
        wait_for(
            lambda: (
                sum(e["type"] == "task-failed" for e in events.events) >= 2
                and any(
                    e["type"] == "task-received" and e["name"] == "tokens.refresh_batch"
                    for e in events.events
                )
            ),
            30,
            message="scheduled batches and failed refreshes",
        )
    received = [e for e in events.events if e["type"] == "task-received"]
    refreshes = [
        e for e in received if e["name"] in ("tokens.refresh_token", "tokens.refresh_batch")
    ]
    by_id = {e["uuid"]: e for e in refreshes}
    for event in refreshes:
        shown = f"{event['args']} {event['kwargs']}"
        assert "payments" in shown or "ledger" in shown, event
    failed = [e for e in events.events if e["type"] == "task-failed"]
    assert any(event["uuid"] in by_id for event in failed)  # a failed refresh we saw start
    for event in failed:
        assert "ledger" in str(event["exception"]), event
        assert "permanent" in str(event["exception"]) or "transient" in str(event["exception"])
        assert "payments" not in str(event["exception"])
    assert healthy.pk != broken.pk


def test_flower__an_idle_minute_sends_at_most_five_bookkeeping_tasks(
    worker: Process, beat, httpserver: HTTPServer
) -> None:
    endpoint = TokenEndpoint(httpserver)
    make_provider("payments", config=oauth2_config(endpoint.url), interval=3600)
    wait_for(lambda: endpoint.calls == 1, 10, message="the first token")
    beat_process = beat()
    with EventLog() as events:
        time.sleep(60)
    sent = [e for e in events.events if e["type"] in ("task-sent", "task-received")]
    bookkeeping = {
        e["uuid"]
        for e in sent
        if e.get("name") not in ("tokens.refresh_token", "tokens.refresh_batch")
    }
    assert len(bookkeeping) <= 5, sorted(str(e.get("name")) for e in sent)
    assert beat_process.alive()
    assert "Sending due task tokens.dispatch" not in beat_process.log()


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
