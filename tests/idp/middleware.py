"""The test IdP's recorder and delays for its token endpoint (see tests.idp).

Every POST to the token endpoint becomes one JSON line in IDP_DIR/token_requests.jsonl, written as
soon as DOT has answered: a test that sees the line knows the request was handled (a rotation is
committed), even while the answer is still held back by an ``after`` delay. Raw tokens, codes and
secrets are never written: the refresh token only as its SHA-256.

For ``grant_type=refresh_token`` the middleware sleeps ``before`` seconds before DOT handles the
request and ``after`` seconds after, before the answer is sent, as IDP_DIR/delay.json says now.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.urls import reverse

from tests.idp import DELAY_FILE, RECORD_FILE, token_hash

IDP_DIR = Path(os.environ["IDP_DIR"])
_write_lock = threading.Lock()


def client_authentication(request: HttpRequest) -> str:
    """How the client authenticated, named as in RFC 8414's token_endpoint_auth_methods."""
    if request.headers.get("Authorization", "").startswith("Basic "):
        return "client_secret_basic"
    if "client_secret" in request.POST:
        return "client_secret_post"
    return "none"


def delays() -> tuple[float, float]:
    try:
        delay = json.loads((IDP_DIR / DELAY_FILE).read_text())
    except FileNotFoundError:
        return 0.0, 0.0
    return float(delay["before"]), float(delay["after"])


def oauth_error(response: HttpResponse) -> str | None:
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def record(line: dict[str, Any]) -> None:
    text = json.dumps(line) + "\n"
    with _write_lock, open(IDP_DIR / RECORD_FILE, "a", encoding="utf-8") as file:
        file.write(text)


class TokenRequestMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST" or request.path != reverse("oauth2_provider:token"):
            return self.get_response(request)
        received = time.time()
        grant_type = request.POST.get("grant_type", "")
        refresh_token = request.POST.get("refresh_token")
        before, after = delays() if grant_type == "refresh_token" else (0.0, 0.0)
        if before:
            print(f"token request ({grant_type}): holding {before}s before handling", flush=True)
            time.sleep(before)
        response = self.get_response(request)
        record(
            {
                "time": received,
                "answered": time.time(),
                "grant_type": grant_type,
                "refresh_token_sha256": token_hash(refresh_token) if refresh_token else None,
                "code_verifier": bool(request.POST.get("code_verifier")),
                "client_auth": client_authentication(request),
                "status": response.status_code,
                "error": oauth_error(response),
                "delay_before": before,
                "delay_after": after,
            }
        )
        if after:
            print(f"token request ({grant_type}): holding the answer {after}s", flush=True)
            time.sleep(after)
        return response
