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
