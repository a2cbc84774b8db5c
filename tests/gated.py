"""A token endpoint that holds every request until the test lets it answer: what was in flight
at once, and over how many connections, is then a count, not a timing.

``GatedEndpoint()`` serves HTTP/1.1 with keep-alive on 127.0.0.1 (HTTPS with ``tls``, which may
require a client certificate). A request waits until ``release(n)`` lets ``n`` answer, or
``open()`` lets every one through; ``in_flight`` and ``most_in_flight`` count the requests held
at once, ``connections`` the TCP connections accepted, and ``requests`` records each request's
form and client certificate CN.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs

from tests.processes import wait_for


@dataclass(frozen=True)
class GatedRequest:
    form: dict[str, str]
    peer_cn: str | None
    connection: int  # which accepted connection carried it (1, 2, ...)
    cookie: str | None = None  # the Cookie header it carried


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one
    server: _GatedServer

    def setup(self) -> None:
        super().setup()
        self.number = self.server.endpoint._connected()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        peer_cn = None
        if isinstance(self.connection, ssl.SSLSocket):
            certificate = self.connection.getpeercert() or {}
            for rdn in certificate.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        peer_cn = value
        endpoint = self.server.endpoint
        number = endpoint._arrive(
            GatedRequest(form, peer_cn, self.number, self.headers.get("Cookie"))
        )
        payload = endpoint.answer(number, form, peer_cn)
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if endpoint.set_cookie:
            self.send_header("Set-Cookie", endpoint.set_cookie)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _GatedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, endpoint: GatedEndpoint, tls: ssl.SSLContext | None) -> None:
        self.endpoint = endpoint
        self.tls = tls
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up on its request closed the connection: not news here

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (TimeoutError, OSError):
            return
        with wrapped:
            super().finish_request(wrapped, client_address)


def _token(number: int, form: dict[str, str], peer_cn: str | None) -> dict[str, Any]:
    return {"access_token": f"gated-{number}", "token_type": "Bearer", "expires_in": 300}


class GatedEndpoint:
    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None = None,
        answer: Callable[[int, dict[str, str], str | None], dict[str, Any]] = _token,
        set_cookie: str | None = None,
    ) -> None:
        self.answer = answer
        self.set_cookie = set_cookie
        self.requests: list[GatedRequest] = []
        self.connections = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self._changed = threading.Condition()
        self._passes = 0
        self._open = False
        self._server = _GatedServer(self, tls)
        port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"gated:{port}",
            daemon=True,
        )
        self._thread.start()

    def _connected(self) -> int:
        with self._changed:
            self.connections += 1
            return self.connections

    def _arrive(self, request: GatedRequest) -> int:
        with self._changed:
            self.requests.append(request)
            number = len(self.requests)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._open or self._passes > 0)
            if not self._open:
                self._passes -= 1
            self.in_flight -= 1
            self._changed.notify_all()
            return number

    def release(self, count: int = 1) -> None:
        """Let ``count`` held (or future) requests answer."""
        with self._changed:
            self._passes += count
            self._changed.notify_all()

    def open(self) -> None:
        """Let every request answer, now and from now on."""
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def wait_in_flight(self, count: int, timeout: float = 30) -> None:
        """Wait until ``count`` requests are held at once (the timeout is a safety net)."""
        wait_for(lambda: self.in_flight >= count, timeout=timeout)

    def close(self) -> None:
        self.open()
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
