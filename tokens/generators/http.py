"""HTTP to token endpoints, bounded: a token endpoint is an outside party.

``post_form()`` is the only way tokens' generators talk HTTP (and the way a project's callable
generator should). Whatever the server does, one call costs at most:

- **TOKENS_HTTP_TIMEOUT seconds in all**: connect, TLS, headers and body together. A deadline,
  not a per-read timeout (a server trickling a byte a second never hits a read timeout); it is
  enforced by cancelling the whole exchange (an asyncio timeout around httpx). Waiting for a
  request slot (below) may take as long again before it starts.
- **TOKENS_HTTP_MAX_BODY bytes**, as received and as decoded: the body is streamed, a gzip or
  deflate body is inflated in bounded steps, any other content encoding is refused.
- **one request**: redirects are never followed (a redirect is an answer, not a token).

Requests share one event loop per process (a thread of its own): any number of threads may wait
on their own requests while these are in flight together, at most TOKENS_HTTP_CONCURRENCY in the
process and TOKENS_HTTP_PER_HOST to one endpoint origin (scheme, host, port). A request that
finds no slot within TOKENS_HTTP_TIMEOUT fails (transient); its own deadline starts when it has
its slot. Connections are pooled and kept alive per origin and per TLS identity: a connection
made with one provider's CAs or client certificate never carries another's request.

TLS certificates are always verified, against the system's trust store or, per provider, a CA
bundle given as PEM text (``ca_certs``); nothing in config can turn verification off, change the
method, or add request options: config supplies form fields and nothing else. A client
certificate (RFC 8705 mutual TLS) comes from the provider's secret, never from a file path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import http.cookiejar
import json
import os
import ssl
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import httpx

from tokens.conf import tokens_settings
from tokens.exceptions import GeneratorError

USER_AGENT = "tokens/0.1 (Django access-token manager)"


@dataclass(frozen=True)
class HttpResponse:
    """A token endpoint's answer: status, headers and the decoded body (at most the cap)."""

    status: int
    headers: httpx.Headers = field(repr=False)
    body: bytes = field(repr=False)
    # When the request was sent: an issuer's lifetime counts from its clock, so from then.
    started: datetime | None = None
    # The credentials it carried, for scrubbing what the issuer says back.
    sent: tuple[str, ...] = field(default=(), repr=False)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "unknown").split(";")[0].strip()[:60] or "unknown"


class BodyTooLarge(GeneratorError):
    """The answer was larger than TOKENS_HTTP_MAX_BODY (as sent, or once decoded)."""

    def __init__(self, limit: int, *, decoded: bool) -> None:
        what = "decodes to more" if decoded else "is larger"
        super().__init__(
            f"token endpoint's answer {what} than {limit} bytes (TOKENS_HTTP_MAX_BODY)",
            transient=True,
        )


def post_form(
    url: str,
    *,
    body: str,
    headers: Mapping[str, str] | None = None,
    ca_certs: str | None = None,
    client_cert: str | None = None,
) -> HttpResponse:
    """POST an ``application/x-www-form-urlencoded`` body to ``url``, within the bounds above.

    ``client_cert``: PEM of a client certificate and its private key, presented in the TLS
    handshake (mutual TLS). Raises GeneratorError (transient) when the endpoint cannot be
    reached, misses the deadline, answers too much, or presents a certificate that does not
    verify.
    """
    return _send(
        url,
        body.encode(),
        "application/x-www-form-urlencoded;charset=UTF-8",
        headers,
        ca_certs,
        client_cert,
    )


def post_json(
    url: str,
    *,
    data: object,
    headers: Mapping[str, str] | None = None,
    ca_certs: str | None = None,
) -> HttpResponse:
    """POST ``data`` as JSON to ``url``, within the same bounds as ``post_form``."""
    body = json.dumps(data, separators=(",", ":")).encode() if data is not None else b""
    return _send(url, body, "application/json", headers, ca_certs, None)


def _send(
    url: str,
    body: bytes,
    content_type: str,
    headers: Mapping[str, str] | None,
    ca_certs: str | None,
    client_cert: str | None,
) -> HttpResponse:
    timeout = tokens_settings.seconds("HTTP_TIMEOUT")
    limit = int(tokens_settings.HTTP_MAX_BODY)
    request_headers = {
        "Accept": "application/json",
        "Accept-Encoding": "identity",
        "Content-Type": content_type,
        "User-Agent": USER_AGENT,
        **(headers or {}),
    }
    context = client_context(ca_certs, client_cert) if client_cert else ssl_context(ca_certs)
    try:
        origin = _origin(url)
    except httpx.InvalidURL:
        raise GeneratorError("token_url is not a valid URL", transient=False) from None
    engine = _engine()
    exchange = engine.exchange(url, origin, body, request_headers, context, timeout, limit)
    try:
        return replace(engine.run(exchange, timeout), sent=_credentials(body, request_headers))
    except NoSlot:
        raise GeneratorError(
            f"no request slot for the token endpoint within {timeout:g}s (this process has "
            "TOKENS_HTTP_CONCURRENCY requests in flight, or TOKENS_HTTP_PER_HOST to this host)",
            transient=True,
        ) from None
    except TimeoutError:
        raise GeneratorError(
            f"token endpoint did not answer within {timeout:g}s (TOKENS_HTTP_TIMEOUT, "
            "the whole request's deadline)",
            transient=True,
        ) from None
    except httpx.ConnectError as error:
        if client_cert and _refused_client_certificate(error):
            raise GeneratorError(
                "token endpoint refused the client certificate in the TLS handshake",
                transient=False,
            ) from None
        if isinstance(error.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(
            error
        ):
            raise GeneratorError(
                "token endpoint's TLS certificate does not verify (set config ca_certs to the "
                "PEM of a private CA; verification is never switched off)",
                transient=True,
            ) from None
        raise GeneratorError(
            f"cannot reach the token endpoint ({type(error).__name__})", transient=True
        ) from None
    except ssl.SSLError as error:  # raised bare by the TLS stream at a read
        if client_cert and _refused_client_certificate(error):
            raise GeneratorError(
                "token endpoint refused the client certificate in the TLS handshake",
                transient=False,
            ) from None
        reason = error.reason if isinstance(error.reason, str) else type(error).__name__
        raise GeneratorError(
            f"TLS with the token endpoint failed ({reason[:60]})", transient=True
        ) from None
    except httpx.InvalidURL:
        raise GeneratorError("token_url is not a valid URL", transient=False) from None
    except httpx.HTTPError as error:
        # Under TLS 1.3 a refused client certificate shows only at the first read, and the
        # asyncio transport keeps nothing of the server's alert: say what it most likely is.
        if client_cert and _refused_client_certificate(error):
            raise GeneratorError(
                "token endpoint refused the client certificate in the TLS handshake",
                transient=False,
            ) from None
        if client_cert and isinstance(error, httpx.ReadError | httpx.RemoteProtocolError):
            raise GeneratorError(
                f"token endpoint closed the connection ({type(error).__name__}): with mutual "
                "TLS, that is how a server refuses a client certificate it does not trust",
                transient=True,
            ) from None
        raise GeneratorError(
            f"cannot reach the token endpoint ({type(error).__name__})", transient=True
        ) from None


# Form fields that carry a credential (RFC 6749, 7521, 7523, 7636).
CREDENTIAL_FIELDS = frozenset(
    {"client_secret", "client_assertion", "assertion", "refresh_token", "code", "code_verifier"}
)


def _credentials(body: bytes, headers: Mapping[str, str]) -> tuple[str, ...]:
    sent = []
    if body and not body.startswith((b"{", b"[")):
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            sent += [v for k, v in parse_qsl(body.decode()) if k in CREDENTIAL_FIELDS and v]
    authorization = headers.get("Authorization", "")
    if " " in authorization:
        sent.append(authorization.split(" ", 1)[1])
    return tuple(sent)


class NoSlot(Exception):
    """No request slot came free within the deadline (see the module)."""


def _origin(url: str) -> tuple[str, str, int]:
    """What TOKENS_HTTP_PER_HOST counts by, and what a pooled connection serves: the URL's
    scheme, host and port."""
    parsed = httpx.URL(url)
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise httpx.InvalidURL("not an absolute http(s) URL")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return (parsed.scheme, parsed.host.lower(), port)


def origin_of(url: str | None) -> tuple[str, str, int] | None:
    """The origin (scheme, host, port) TOKENS_HTTP_PER_HOST counts ``url`` under; None when
    it is no absolute http(s) URL."""
    if not url:
        return None
    try:
        return _origin(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return None


class _Engine:
    """This process's HTTP: one event loop on a thread of its own, its slots, and one pooled
    client per TLS identity and endpoint origin (see the module). Made on first use; a forked
    child makes its own."""

    # Pooled clients kept at most: one per TLS identity (CAs, client certificate) and endpoint
    # origin. Per origin, not one for all: httpcore's pool does work quadratic in its
    # connections on every request, and an origin has at most TOKENS_HTTP_PER_HOST of them.
    CLIENTS = 256

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        # Name lookups run here; one that hangs past a deadline is left behind, not waited for
        # (it keeps its thread: as many threads as requests may be in flight, made as needed,
        # so that one origin whose names hang cannot hold up every new connection).
        self.loop.set_default_executor(
            ThreadPoolExecutor(
                max_workers=max(8, int(tokens_settings.HTTP_CONCURRENCY)),
                thread_name_prefix="tokens-dns",
            )
        )
        # Touched on the loop's thread only.
        self.clients: OrderedDict[
            tuple[int, tuple[str, str, int]], tuple[ssl.SSLContext, httpx.AsyncClient, list[int]]
        ] = OrderedDict()
        self.slots: dict[object, asyncio.Semaphore] = {}
        ready = threading.Event()
        self.thread = threading.Thread(
            target=self._serve, args=(ready,), name="tokens-http", daemon=True
        )
        self.thread.start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    def run(
        self, exchange: Coroutine[object, object, HttpResponse], timeout: float
    ) -> HttpResponse:
        """Run ``exchange`` on the loop and wait for it in this thread. Whatever stops the wait
        (a Celery time limit, a signal) cancels the exchange."""
        future = asyncio.run_coroutine_threadsafe(exchange, self.loop)
        try:
            # The exchange bounds itself (slot wait, then its deadline); this is a backstop.
            return future.result(timeout=2 * timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError from None
        except BaseException:
            future.cancel()
            raise

    def _slot(self, key: object, size: int) -> asyncio.Semaphore:
        # Keyed with its size too: a changed setting takes effect for new requests at once.
        slot = self.slots.get((key, size))
        if slot is None:
            slot = self.slots[(key, size)] = asyncio.Semaphore(size)
        return slot

    def _client(
        self, context: ssl.SSLContext, origin: tuple[str, str, int]
    ) -> tuple[httpx.AsyncClient, list[int]]:
        key = (id(context), origin)
        entry = self.clients.get(key)
        if entry is not None and entry[0] is context:
            self.clients.move_to_end(key)
            return entry[1], entry[2]
        client = httpx.AsyncClient(
            verify=context,
            follow_redirects=False,
            # No cookies, ever: a client is shared by every provider of this origin and TLS
            # identity, and one provider's cookies must not ride along with another's request.
            cookies=http.cookiejar.CookieJar(
                policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
            ),
            # Deadlines are ours (asyncio.timeout); the pool never makes a request wait.
            timeout=httpx.Timeout(None),
            limits=httpx.Limits(
                max_connections=None, max_keepalive_connections=None, keepalive_expiry=15.0
            ),
        )
        # The context is kept with it: an id is only unique while its object lives.
        self.clients[key] = (context, client, [0])
        idle = [k for k, (_, _, users) in self.clients.items() if not users[0] and k != key]
        for old in idle[: max(0, len(self.clients) - self.CLIENTS)]:
            _, closing, _ = self.clients.pop(old)
            self.loop.create_task(closing.aclose())
        return client, self.clients[key][2]

    async def exchange(
        self,
        url: str,
        origin: tuple[str, str, int],
        body: bytes,
        headers: dict[str, str],
        context: ssl.SSLContext,
        timeout: float,
        limit: int,
    ) -> HttpResponse:
        host = self._slot(origin, max(1, int(tokens_settings.HTTP_PER_HOST)))
        total = self._slot("all", max(1, int(tokens_settings.HTTP_CONCURRENCY)))
        # The host's slot first, then the process's: a request queued behind its host's bound
        # never holds one of the process's slots that other hosts could use.
        waited = self.loop.time() + timeout
        try:
            async with asyncio.timeout_at(waited):
                await host.acquire()
        except TimeoutError:
            raise NoSlot from None
        try:
            try:
                async with asyncio.timeout_at(waited):
                    await total.acquire()
            except TimeoutError:
                raise NoSlot from None
            try:
                client, users = self._client(context, origin)
                users[0] += 1
                try:
                    started = datetime.now(UTC)
                    async with asyncio.timeout(timeout):
                        response = await _post(client, url, body, headers, limit)
                    return replace(response, started=started)
                finally:
                    users[0] -= 1
            finally:
                total.release()
        finally:
            host.release()


_engines: list[_Engine] = []
_engines_lock = threading.Lock()


def _engine() -> _Engine:
    engine = _engines[0] if _engines else None
    if engine is not None and engine.pid == os.getpid():
        return engine
    with _engines_lock:
        if not _engines or _engines[0].pid != os.getpid():
            _engines[:] = [_Engine()]  # a forked child: its parent's loop thread is not here
        return _engines[0]


async def _post(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    limit: int,
) -> HttpResponse:
    async with client.stream("POST", url, content=body, headers=headers) as response:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(limit, decoded=False)
        decoder = _decoder(response.headers.get("Content-Encoding", ""), limit)
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > limit:
                raise BodyTooLarge(limit, decoded=False)
            decoder.feed(chunk)
        return HttpResponse(response.status_code, response.headers, decoder.finish())


class _Identity:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self.parts.append(chunk)

    def finish(self) -> bytes:
        return b"".join(self.parts)


class _Inflate(_Identity):
    """gzip or deflate (zlib-wrapped or raw), inflated at most ``limit`` bytes at a time."""

    def __init__(self, limit: int, wbits: int) -> None:
        super().__init__(limit)
        self.wbits = wbits
        self.inflater: zlib._Decompress | None = None
        self.size = 0
        self.first = b""

    def feed(self, chunk: bytes) -> None:
        if self.inflater is None:
            self.first += chunk
            if len(self.first) < 2 and self.wbits != 47:
                return
            wbits = self.wbits
            if wbits == 15 and (self.first[0] & 0x0F != 8 or int.from_bytes(self.first[:2]) % 31):
                wbits = -15  # "deflate" sent raw, as some servers do
            self.inflater = zlib.decompressobj(wbits)
            chunk, self.first = self.first, b""
        self._inflate(chunk)

    def _inflate(self, data: bytes) -> None:
        assert self.inflater is not None
        while data:
            try:
                out = self.inflater.decompress(data, self.limit - self.size + 1)
            except zlib.error:
                raise GeneratorError(
                    "token endpoint sent a body that does not decode", transient=True
                ) from None
            self._keep(out)
            data = self.inflater.unconsumed_tail
            if not data and self.inflater.eof and self.inflater.unused_data and self.wbits == 47:
                # Another gzip member follows (RFC 1952 allows several).
                data = self.inflater.unused_data
                self.inflater = zlib.decompressobj(47)

    def _keep(self, out: bytes) -> None:
        self.size += len(out)
        if self.size > self.limit:
            raise BodyTooLarge(self.limit, decoded=True)
        self.parts.append(out)

    def finish(self) -> bytes:
        if self.first:
            self.inflater = zlib.decompressobj(self.wbits)
            self._inflate(self.first)
        if self.inflater is not None:
            self._keep(self.inflater.flush())
        return b"".join(self.parts)


def _decoder(encoding: str, limit: int) -> _Identity:
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return _Identity(limit)
    if len(codings) == 1 and codings[0] in {"gzip", "x-gzip"}:
        return _Inflate(limit, 47)
    if len(codings) == 1 and codings[0] == "deflate":
        return _Inflate(limit, 15)
    raise GeneratorError(
        f"token endpoint sent an unsupported content encoding ({encoding[:40]!r})",
        transient=True,
    )


@functools.lru_cache(maxsize=64)
def ssl_context(ca_certs: str | None = None) -> ssl.SSLContext:
    """The verifying TLS context: the default trust store, or only the CAs in ``ca_certs``."""
    if ca_certs:
        return ssl.create_default_context(cadata=ca_certs)
    return httpx.create_ssl_context()


_client_contexts: dict[tuple[str | None, str], ssl.SSLContext] = {}
_client_contexts_lock = threading.Lock()


def client_context(ca_certs: str | None, client_pem: str) -> ssl.SSLContext:
    """The verifying context of ``ssl_context`` presenting the client certificate and key in
    ``client_pem``. The key is handed to OpenSSL through an anonymous in-memory file (never a
    file on disk); contexts are kept per (CAs, digest of the PEM)."""
    cache_key = (ca_certs, hashlib.sha256(client_pem.encode()).hexdigest())
    with _client_contexts_lock:
        context = _client_contexts.get(cache_key)
        if context is None:
            if ca_certs:
                context = ssl.create_default_context(cadata=ca_certs)
            else:
                context = httpx.create_ssl_context()
            _load_client_pem(context, client_pem)
            if len(_client_contexts) >= 64:
                _client_contexts.clear()
            _client_contexts[cache_key] = context
        return context


def _load_client_pem(context: ssl.SSLContext, client_pem: str) -> None:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("tokens-client-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, client_pem.encode())
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    # No anonymous files here (not Linux): a private file, removed at once.
    with tempfile.TemporaryDirectory(prefix="tokens-") as directory:
        path = os.path.join(directory, "client.pem")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(client_pem)
        context.load_cert_chain(path)


def _refused_client_certificate(error: BaseException) -> bool:
    """Whether the server's TLS alert refused our certificate (anywhere in the chain)."""
    texts = []
    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            break
        texts.append(f"{type(seen).__name__} {seen}")
        seen = seen.__cause__ or seen.__context__
    text = " ".join(texts).upper()
    alerts = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN")
    return any(alert in text for alert in alerts)


def check_ca_certs(value: object) -> str | None:
    """The problem with a ``ca_certs`` config value, or None when it holds PEM certificates."""
    if not isinstance(value, str) or "-----BEGIN CERTIFICATE-----" not in value:
        return "must be PEM text of one or more CA certificates (-----BEGIN CERTIFICATE-----)"
    try:
        ssl.create_default_context(cadata=value)
    except (ssl.SSLError, ValueError):
        return "does not hold a readable PEM certificate"
    return None
