"""A scriptable OAuth2 token endpoint on pytest-httpserver (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response


class TokenEndpoint:
    """Issues ``tok-1``, ``tok-2``, ... ; ``fail_with`` / ``delay`` change how it answers."""

    def __init__(self, server: HTTPServer, *, expires_in: int = 300) -> None:
        self.server = server
        self.expires_in = expires_in
        self.calls = 0
        self.issued: list[str] = []
        self.delay = 0.0
        self.fail_with: tuple[int, str, str] | None = None
        self.fail_headers: dict[str, str] = {}
        self.times: list[float] = []  # when each call arrived (time.monotonic())
        self.in_flight = 0
        self.max_in_flight = 0
        self.delays: list[float] = []  # per-call delays, consumed first
        self._lock = threading.Lock()
        server.expect_request("/token", method="POST").respond_with_handler(self._handle)

    @property
    def url(self) -> str:
        return self.server.url_for("/token")

    def _handle(self, request: Request) -> Response:
        with self._lock:
            self.calls += 1
            self.times.append(time.monotonic())
            number = self.calls
            delay = self.delays.pop(0) if self.delays else self.delay
            failure = self.fail_with
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if delay:
                time.sleep(delay)
        finally:
            with self._lock:
                self.in_flight -= 1
        if failure is not None:
            status, body, content_type = failure
            return Response(
                body, status=status, content_type=content_type, headers=self.fail_headers
            )
        token = f"tok-{number}"
        with self._lock:
            self.issued.append(token)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        return Response(json.dumps(body), content_type="application/json")

    def calls_after(self, action: Callable[[], object]) -> int:
        before = self.calls
        action()
        return self.calls - before
