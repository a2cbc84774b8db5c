"""A hostile token endpoint the tests serve themselves: raw sockets, so it can misbehave in ways
a well-mannered HTTP server library would not (trickle, inflate, lie about its certificate).

``HostileEndpoint(answer)`` listens on 127.0.0.1; each connection reads one request (kept in
``requests`` as raw bytes) and hands the socket to ``answer(sock, request)``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Answer = Callable[[socket.socket, bytes], None]


class HostileEndpoint:
    def __init__(self, answer: Answer, *, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.handshake_failures = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = "localhost" if self.tls else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}/token"

    def _serve(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    def _handle(self, sock: socket.socket) -> None:
        with contextlib.closing(sock):
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    self.handshake_failures += 1
                    return
            sock.settimeout(10)
            try:
                request = _read_request(sock)
            except OSError:
                return
            self.requests.append(request)
            with contextlib.suppress(OSError):
                self.answer(sock, request)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(2)

    def __enter__(self) -> HostileEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def token_body(token: str = "hostile-token-1", expires_in: float = 300) -> bytes:
    return json.dumps(
        {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
    ).encode()


def respond(
    status: str = "200 OK", body: bytes = b"", headers: dict[str, str | None] | None = None
) -> Answer:
    """An answer sent at once (a header given as None is left out)."""

    def answer(sock: socket.socket, request: bytes) -> None:
        fields: dict[str, str | None] = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
        }
        fields.update(headers or {})
        head = f"HTTP/1.1 {status}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in fields.items() if v is not None
        )
        sock.sendall(head.encode() + b"\r\n" + body)

    return answer


def trickle(every: float, *, phase: str = "body", total: float = 60.0) -> Answer:
    """A byte every ``every`` seconds, in the headers or in the body, for up to ``total``."""

    def answer(sock: socket.socket, request: bytes) -> None:
        body = token_body()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        slow, fast = (head, b"") if phase == "headers" else (body, head)
        sock.sendall(fast)
        deadline = time.monotonic() + total
        for i in range(len(slow)):
            if time.monotonic() > deadline:
                return
            sock.sendall(slow[i : i + 1])
            time.sleep(every)
        if phase == "headers":
            sock.sendall(body)

    return answer


def gzip_bomb(inflated: int = 1024**3) -> bytes:
    """One gzip stream of ``inflated`` bytes of zeros, about a thousandth of that size (made
    once, in a few seconds, and kept under .state/)."""
    path = Path(__file__).resolve().parent.parent / ".state" / f"gzip-bomb-{inflated}.gz"
    if not path.is_file():
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        block = bytes(1024 * 1024)
        parts = [compressor.compress(block) for _ in range(inflated // len(block))]
        parts.append(compressor.flush())
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_bytes(b"".join(parts))
        partial.replace(path)
    return path.read_bytes()


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for localhost and 127.0.0.1, and its key, as PEM files."""

    cert_pem: str
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def self_signed(directory: Path) -> Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokens test impostor")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_text(cert_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_pem, cert_path, key_path)
