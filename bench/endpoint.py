"""A local OAuth2 client-credentials token endpoint for the benchmarks, in a process of its own.

    with TokenEndpoint(latency=0.2, ports=4, lifetime=20) as endpoint:
        endpoint.urls                # ["http://127.0.0.1:PORT/token", ...], one per port
        endpoint.set_failing(True)   # every answer a 503 until set_failing(False)
        endpoint.set_failing(True, url)  # ... on that port only
        endpoint.requests(url)       # token requests that port saw since the last reset()
        endpoint.issued_at(url)      # when that port last issued a token

``POST /token`` with ``grant_type=client_credentials`` and any client authentication (HTTP
Basic, or ``client_id`` in the form) answers after ``latency`` seconds with
``{"access_token": "t<n>x<expiry ms>", "token_type": "Bearer", "expires_in": lifetime}``: the
token carries its own absolute expiry (``token_expiry()``), so a caller can tell afterwards
whether a token it was handed had expired. The server is plain asyncio streams (HTTP/1.1,
keep-alive, Content-Length bodies), and waits with ``asyncio.sleep``, so thousands of requests
can wait at once; the counters live in shared memory that only the server writes (a reset is a
baseline kept in the parent). The process is started with multiprocessing's "spawn" (no
fork of a process with threads and open connections): a script that starts it directly needs
the usual ``if __name__ == "__main__":`` guard (``python -m bench`` has it). ``python -m
bench.endpoint`` checks that it is never the bottleneck: 300 concurrent requests at 0.2 s
latency, and 600 requests a second at 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import socket
import sys
import time
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

BACKLOG = 4096
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}
# Slots of the shared settings (doubles) and of the shared gauges (int64).
LATENCY, LIFETIME = 0, 1
IN_FLIGHT, IN_FLIGHT_MAX, SEQUENCE = 0, 1, 2


class _Shared:
    """Shared memory between the benchmark and the server: the parent writes the settings and
    the failing flags, the server everything else."""

    def __init__(self, context: Any, ports: int, latency: float, lifetime: float) -> None:
        self.settings = context.RawArray("d", [float(latency), float(lifetime)])
        self.failing = context.RawArray("b", ports)  # per port
        self.requests = context.RawArray("q", ports)  # per port, failed ones included
        self.failures = context.RawArray("q", ports)  # per port, 503s of a failing port
        self.issued = context.RawArray("d", ports)  # per port, when its last token was issued
        self.gauges = context.RawArray("q", 3)


def token_expiry(token: str) -> float:
    """The absolute expiry (unix seconds) that a token of this endpoint carries."""
    _, _, millis = token.rpartition("x")
    return int(millis) / 1000


class TokenEndpoint:
    """The token endpoint in a separate process, for a ``with`` block."""

    def __init__(self, latency: float = 0.0, ports: int = 1, lifetime: int = 3600) -> None:
        if ports < 1:
            raise ValueError("ports must be at least 1")
        self._context = multiprocessing.get_context("spawn")
        self._shared = _Shared(self._context, ports, latency, lifetime)
        self._baseline = [0] * ports
        self._failures_baseline = [0] * ports
        self._ports = ports
        self._process: Any = None
        self.urls: list[str] = []

    @property
    def url(self) -> str:
        return self.urls[0]

    def __enter__(self) -> TokenEndpoint:
        receiver, sender = self._context.Pipe(duplex=False)
        self._process = self._context.Process(
            target=_serve,
            args=(self._ports, self._shared),
            kwargs={"ready": sender, "parent": os.getpid()},
            name="bench-token-endpoint",
            daemon=True,
        )
        self._process.start()
        sender.close()
        try:
            if not receiver.poll(30):
                raise RuntimeError("the token endpoint did not start within 30 s")
            ports = receiver.recv()
        except BaseException:
            self._stop()
            raise
        finally:
            receiver.close()
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        self.urls = [f"http://127.0.0.1:{port}/token" for port in ports]
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(10)
            self._process = None

    def set_latency(self, seconds: float) -> None:
        """Answers from now on come after ``seconds`` (requests already waiting keep theirs)."""
        self._shared.settings[LATENCY] = float(seconds)

    def set_lifetime(self, seconds: float) -> None:
        """Tokens issued from now on live ``seconds`` (``expires_in``)."""
        self._shared.settings[LIFETIME] = float(seconds)

    def set_failing(self, failing: bool, url: str | None = None) -> None:
        """While failing, every answer (after the latency) is a 503 temporarily_unavailable: on
        ``url``'s port, or on all ports."""
        for i in self._indexes(url):
            self._shared.failing[i] = 1 if failing else 0

    def _indexes(self, url: str | None) -> list[int]:
        return list(range(self._ports)) if url is None else [self.urls.index(url)]

    def requests(self, url: str | None = None) -> int:
        """Token requests (answered or not, failed ones included) since the last reset(): on
        ``url``'s port, or on all ports."""
        return sum(self._shared.requests[i] - self._baseline[i] for i in self._indexes(url))

    def failures(self, url: str | None = None) -> int:
        """Requests answered 503 because the port was failing, since the last reset()."""
        return sum(
            self._shared.failures[i] - self._failures_baseline[i] for i in self._indexes(url)
        )

    def issued_at(self, url: str) -> float:
        """When ``url``'s port last issued a token (unix seconds; 0.0 before the first)."""
        return float(self._shared.issued[self.urls.index(url)])

    def in_flight_max(self) -> int:
        """The most requests waiting at once (all ports) since the last reset()."""
        return int(self._shared.gauges[IN_FLIGHT_MAX])

    def in_flight(self) -> int:
        return int(self._shared.gauges[IN_FLIGHT])

    def cpu_seconds(self) -> float:
        """CPU time the server process used so far (user + system)."""
        import psutil

        times = psutil.Process(self._process.pid).cpu_times()
        return float(times.user + times.system)

    def reset(self) -> None:
        """Start the counters again from zero (the server's own counters never go back)."""
        self._baseline = list(self._shared.requests)
        self._failures_baseline = list(self._shared.failures)
        self._shared.gauges[IN_FLIGHT_MAX] = self._shared.gauges[IN_FLIGHT]


# ---------------------------------------------------------------------------- the server process


def _serve(ports: int, shared: _Shared, *, ready: Any, parent: int) -> None:
    asyncio.run(_Server(shared).run(ports, ready, parent))


class _Server:
    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.gauges = shared.gauges

    async def run(self, ports: int, ready: Any, parent: int) -> None:
        servers = [
            await asyncio.start_server(
                functools.partial(self.connection, index),
                "127.0.0.1",
                0,
                backlog=BACKLOG,
                limit=MAX_HEAD,
            )
            for index in range(ports)
        ]
        ready.send([server.sockets[0].getsockname()[1] for server in servers])
        ready.close()
        while os.getppid() == parent:  # never outlive the benchmark
            await asyncio.sleep(1)

    async def connection(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self.send(writer, 431, {"error": "invalid_request"}, keep=False)
                    return
                lines = head.decode("latin-1").split("\r\n")
                try:
                    method, target, version = lines[0].split(" ", 2)
                except ValueError:
                    await self.send(writer, 400, {"error": "invalid_request"}, keep=False)
                    return
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    name, colon, value = line.partition(":")
                    if colon:
                        headers[name.strip().lower()] = value.strip()
                connection = headers.get("connection", "").lower()
                keep = (
                    "keep-alive" in connection
                    if version == "HTTP/1.0"
                    else "close" not in connection
                )
                if "transfer-encoding" in headers:
                    await self.send(writer, 411, {"error": "invalid_request"}, keep=False)
                    return
                try:
                    length = int(headers.get("content-length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    await self.send(writer, 413, {"error": "invalid_request"}, keep=False)
                    return
                body = await reader.readexactly(length) if length else b""
                status, payload = await self.answer(index, method, target, headers, body)
                await self.send(writer, status, payload, keep=keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(
        self, index: int, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        if target.split("?", 1)[0] != "/token":
            return 404, {"error": "not_found"}
        if method != "POST":
            return 405, {"error": "invalid_request"}
        self.shared.requests[index] += 1
        self.gauges[IN_FLIGHT] += 1
        self.gauges[IN_FLIGHT_MAX] = max(self.gauges[IN_FLIGHT_MAX], self.gauges[IN_FLIGHT])
        try:
            latency = self.settings[LATENCY]
            if latency > 0:
                await asyncio.sleep(latency)
            if self.shared.failing[index]:
                self.shared.failures[index] += 1
                return 503, {"error": "temporarily_unavailable"}
            form = parse_qs(body.decode("latin-1"))
            if form.get("grant_type") != ["client_credentials"]:
                return 400, {"error": "unsupported_grant_type"}
            if "client_id" not in form and not headers.get("authorization", "").startswith(
                "Basic "
            ):
                return 401, {"error": "invalid_client"}
            self.gauges[SEQUENCE] += 1
            lifetime = self.settings[LIFETIME]
            now = time.time()
            self.shared.issued[index] = now
            expiry = int((now + lifetime) * 1000)
            return 200, {
                "access_token": f"t{self.gauges[SEQUENCE]}x{expiry}",
                "token_type": "Bearer",
                "expires_in": int(lifetime),
            }
        finally:
            self.gauges[IN_FLIGHT] -= 1

    @staticmethod
    async def send(
        writer: asyncio.StreamWriter, status: int, payload: dict[str, Any], *, keep: bool
    ) -> None:
        body = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\n"
            "Content-Type: application/json\r\n"
            "Cache-Control: no-store\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        )
        writer.write(head.encode("latin-1") + body)
        await writer.drain()


# ---------------------------------------------------------------------------- self-check


async def _client(port: int, count: int, start: asyncio.Event) -> list[float]:
    """One keep-alive connection making ``count`` requests in turn; their durations."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"grant_type=client_credentials&client_id=check&client_secret=check"
    request = (
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    durations = []
    await start.wait()
    for _ in range(count):
        started = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        payload = json.loads(await reader.readexactly(length))
        assert head.startswith(b"HTTP/1.1 200"), head
        assert token_expiry(payload["access_token"]) > time.time()
        durations.append(time.perf_counter() - started)
    writer.close()
    return durations


async def _load(port: int, connections: int, each: int) -> tuple[float, list[float]]:
    start = asyncio.Event()
    tasks = [asyncio.create_task(_client(port, each, start)) for _ in range(connections)]
    await asyncio.sleep(0.5)  # every connection open before the clock starts
    started = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    return time.perf_counter() - started, [d for r in results for d in r]


def main() -> int:
    with TokenEndpoint(latency=0.2) as endpoint:
        port = int(endpoint.url.rsplit(":", 1)[1].split("/")[0])
        wall, durations = asyncio.run(_load(port, 300, 1))
        print(
            f"300 concurrent requests, 0.2 s latency: {wall:.3f} s wall, slowest "
            f"{max(durations):.3f} s; endpoint saw {endpoint.requests()}, at most "
            f"{endpoint.in_flight_max()} at once",
            flush=True,
        )
        ok = wall < 0.5
        endpoint.reset()
        endpoint.set_latency(1.0)
        # 600 connections, each a request at a time for 5 s: 600 requests a second.
        cpu = endpoint.cpu_seconds()
        wall, durations = asyncio.run(_load(port, 600, 5))
        rate = endpoint.requests() / wall
        print(
            f"600 connections x 5 requests, 1 s latency: {rate:.0f} requests/s over {wall:.2f} s, "
            f"slowest {max(durations):.3f} s, at most {endpoint.in_flight_max()} at once; "
            f"the endpoint used {(endpoint.cpu_seconds() - cpu) / wall:.0%} of a core",
            flush=True,
        )
        ok = ok and rate >= 500 and max(durations) < 1.5
        endpoint.reset()
        endpoint.set_latency(0)
        endpoint.set_failing(True)
        failed = asyncio.run(_failing(port))
        print(f"failing: {failed}; failures counted {endpoint.failures()}", flush=True)
        ok = ok and failed.startswith("HTTP/1.1 503") and endpoint.failures() == 1
    print("ok" if ok else "TOO SLOW OR WRONG", flush=True)
    return 0 if ok else 1


async def _failing(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"grant_type=client_credentials&client_id=check"
    writer.write(
        b"POST /token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    answer = (await reader.read()).decode()
    writer.close()
    return answer.split("\r\n")[0] + " " + answer.rsplit("\r\n", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
