"""An identity provider that echoes what it was sent into its error_description: the client
secret comes back as it is, inside a Basic header's base64, form-encoded, and cut short by the
IdP's own length limit. A real worker refreshes; afterwards no piece of the secret is in the
stored error, the worker's log, the health endpoint, admin pages, or get_token()'s error."""

from __future__ import annotations

import json
from base64 import b64encode

import pytest
from django.contrib.auth.models import User
from django.test import Client
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.factories import SECRET, make_provider, oauth2_config
from tests.leaks import leaked
from tests.processes import Process, wait_for
from tokens import TokenUnavailable, get_token, queue
from tokens.constants import Reason
from tokens.models import ProviderState

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ECHOES = {
    # What the IdP puts in error_description, given the request's Authorization and body.
    "authorization header": lambda auth, body: f"unknown client, header was {auth}",
    "header past the old cut": lambda auth, body: "x" * 100 + f" {auth}",
    "form body": lambda auth, body: f"bad request: {body}",
    "raw secret cut by the IdP": lambda auth, body: f"secret={SECRET}"[:30],
    "secret in a longer word": lambda auth, body: f"...{SECRET}{SECRET}...",
}


class EchoingIdp:
    def __init__(self, server: HTTPServer) -> None:
        self.echo = ECHOES["authorization header"]
        self.received: list[str] = []
        server.expect_request("/token").respond_with_handler(self._handle)
        self.url = server.url_for("/token")

    def _handle(self, request: Request) -> Response:
        auth = request.headers.get("Authorization", "")
        body = request.get_data(as_text=True)
        self.received.append(auth + body)
        description = self.echo(auth, body)
        return Response(
            json.dumps({"error": "invalid_client", "error_description": description}),
            status=401,
            content_type="application/json",
        )


def test_echoing_idp__no_piece_of_the_secret_leaves(
    worker: Process, httpserver: HTTPServer
) -> None:
    idp = EchoingIdp(httpserver)
    basic = make_provider("basic", config=oauth2_config(idp.url))
    post = make_provider("post", config=oauth2_config(idp.url, auth_method="client_secret_post"))
    wait_for(lambda: len(idp.received) >= 2, 10, message="the first two refreshes")
    expected = b64encode(f"client-1:{SECRET}".encode()).decode()
    assert any(expected in seen for seen in idp.received)  # the echo really carries it
    errors: list[str] = []
    for name, echo in ECHOES.items():
        idp.echo = echo
        for provider in (basic, post):
            before = ProviderState.objects.get(provider=provider).consecutive_failures
            queue.refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, after_commit=False)
            wait_for(
                lambda p=provider, b=before: (
                    ProviderState.objects.get(provider=p).consecutive_failures > b
                ),
                10,
                message=f"a refresh of {provider.name} with the echo {name!r}",
            )
            errors.append(ProviderState.objects.get(provider=provider).last_error)
    assert all("invalid_client" in error for error in errors)
    assert any("withheld: it echoed a credential" in error for error in errors)

    admin = Client()
    admin.force_login(User.objects.create_superuser("op", "op@example.com", "pw"))
    unavailable = []
    for name in ("basic", "post"):
        with pytest.raises(TokenUnavailable) as caught:
            get_token(name, timeout=0.2)
        unavailable.append(str(caught.value))
    haystacks = {
        "stored errors": "\n".join(errors),
        "worker log": worker.log(),
        "health": admin.get("/tokens/health/").content.decode(),
        "metrics": admin.get("/tokens/metrics").content.decode(),
        "admin list": admin.get("/admin/tokens/provider/").content.decode(),
        "admin page": admin.get(f"/admin/tokens/provider/{basic.pk}/change/").content.decode(),
        "get_token errors": "\n".join(unavailable),
    }
    assert "invalid_client" in haystacks["health"] and "invalid_client" in haystacks["worker log"]
    found = {where: leaked(text, SECRET) for where, text in haystacks.items()}
    assert {where: pieces for where, pieces in found.items() if pieces} == {}
