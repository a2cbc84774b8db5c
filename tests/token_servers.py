"""Real token endpoints on 127.0.0.1, for end-to-end tests of the client side of token protocols.

- ``AssertionServer``: an OAuth 2 token endpoint built on authlib's server classes: the RFC 7523
  JWT bearer grant (§2.1) and client credentials, with client authentication ``private_key_jwt``
  and ``client_secret_jwt`` (RFC 7523 §2.2), ``client_secret_basic`` and ``client_secret_post``.
- ``MtlsServer``: HTTPS that requires a client certificate from a test CA; client credentials
  with RFC 8705 §2.1 ``tls_client_auth``.
- ``GitHubAppServer``: GitHub's "create an installation access token for an app".

Each is a context manager serving from a ThreadingHTTPServer in a daemon thread on a free port,
and records what every request carried in ``.requests``. A record is appended before its
response is sent: a client that has its answer finds its record.
"""

from __future__ import annotations

import datetime
import hmac
import json
import re
import secrets
import ssl
import string
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeGuard, TypeVar
from urllib.parse import parse_qsl

from authlib.common.security import generate_token
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import ClientCredentialsGrant
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6749.util import scope_to_list
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion, JWTBearerGrant
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, OctKey, RSAKey

from tests.keys import TestCA

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = JWTBearerClientAssertion.CLIENT_ASSERTION_TYPE
_JWT_AUTH_METHODS = frozenset({"private_key_jwt", "client_secret_jwt"})
_SECRET_FIELDS = frozenset({"client_secret", "assertion", "client_assertion"})


# --- What the servers record ---------------------------------------------------------------


@dataclass(frozen=True)
class Jwt:
    """A JWT whose signature the server verified: its protected header and its claims."""

    header: dict[str, Any]
    claims: dict[str, Any]


@dataclass(frozen=True)
class TokenRequest:
    """One request to an OAuth token endpoint (``AssertionServer``, ``MtlsServer``)."""

    method: str
    path: str
    grant_type: str | None
    #: The client authentication the request carried, read from its shape whether or not it
    #: succeeded: "client_secret_basic", "client_secret_post", "private_key_jwt",
    #: "client_secret_jwt", "tls_client_auth", "none" (a bare client_id) or None; several are
    #: joined with "+".
    auth_method: str | None
    #: The client a token was issued to (for a JWT bearer grant: the issuer); None on errors.
    client_id: str | None
    #: The form fields, without client_secret, assertion and client_assertion.
    form: dict[str, str]
    #: The verified grant assertion (RFC 7523 §2.1); None if absent or refused.
    assertion: Jwt | None
    #: The verified client assertion (RFC 7523 §2.2); None if absent or refused.
    client_assertion: Jwt | None
    #: ``MtlsServer``: the subject CN of the (CA-verified) client certificate.
    peer_cn: str | None
    status: int
    #: The ``error`` code of an error answer.
    error: str | None


@dataclass(frozen=True)
class GitHubRequest:
    """One request to ``GitHubAppServer``."""

    method: str
    path: str
    installation_id: int | None
    #: The app JWT, once its RS256 signature verified (recorded even if its claims were refused).
    jwt: Jwt | None
    #: The JSON body (None when there was none or it was not JSON).
    body: Any
    #: The request headers, without Authorization.
    headers: dict[str, str]
    status: int
    #: GitHub's ``message`` of an error answer.
    message: str | None


# --- HTTP plumbing --------------------------------------------------------------------------


@dataclass(frozen=True)
class _HttpRequest:
    method: str
    path: str
    query: str
    headers: Message
    body: bytes
    peer_cert: dict[str, Any] | None  # the verified client certificate (TLS servers)


@dataclass(frozen=True)
class _HttpResponse:
    status: int
    body: bytes
    headers: list[tuple[str, str]]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _json_response(
    status: int, payload: object, headers: Collection[tuple[str, str]] = ()
) -> _HttpResponse:
    content_type = ("Content-Type", "application/json; charset=utf-8")
    return _HttpResponse(status, json.dumps(payload).encode(), [content_type, *headers])


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        peer = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        request = _HttpRequest(self.command, path, query, self.headers, body, peer or None)
        try:
            response = self.server.app(request)
        except Exception:
            traceback.print_exc()
            response = _json_response(500, {"error": "server_error"})
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, app: Callable[[_HttpRequest], _HttpResponse], context: ssl.SSLContext | None
    ) -> None:
        self.app = app
        self.context = context
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread, not in the accept loop.
        if self.context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError: no client certificate, an unknown CA, ...
            return
        with tls:
            super().finish_request(tls, client_address)


RecordT = TypeVar("RecordT")


class _Server(Generic[RecordT]):
    """Binds 127.0.0.1 on a free port in ``__init__``; subclasses then ``_start()``."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.requests: list[RecordT] = []
        self._lock = threading.Lock()
        self._httpd = _HTTPServer(self._respond, context)
        port = self._httpd.server_address[1]
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how soon close() returns
            name=f"{type(self).__name__}:{port}",
            daemon=True,
        )
        self._closed = False

    def _start(self) -> None:
        self._thread.start()

    def _respond(self, request: _HttpRequest) -> _HttpResponse:
        raise NotImplementedError

    def _record(self, record: RecordT) -> None:
        with self._lock:
            self.requests.append(record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- authlib glue ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """A client registered with ``AssertionServer``; the key in ``clients`` is its client_id."""

    #: Its token_endpoint_auth_method: "client_secret_basic", "client_secret_post",
    #: "client_secret_jwt" (needs ``secret``) or "private_key_jwt" (needs ``public_key_pem``).
    auth_method: str
    secret: str | None = None
    public_key_pem: str | None = None
    grant_types: Collection[str] = ("client_credentials",)
    #: The scopes it may ask for; None: any.
    scopes: Collection[str] | None = None


@dataclass(frozen=True)
class Issuer:
    """An issuer of RFC 7523 §2.1 grant assertions; the key in ``issuers`` is its ``iss``
    (a Google-style service-account email, a Salesforce-style consumer key, ...)."""

    public_key_pem: str
    #: The ``sub`` values it may assert; None: any (a missing ``sub`` is always accepted).
    subjects: Collection[str] | None = None
    #: The scopes it may ask for; None: any.
    scopes: Collection[str] | None = None


def _public_key(pem: str) -> RSAKey | ECKey:
    loaded = serialization.load_pem_public_key(pem.encode())
    if isinstance(loaded, rsa.RSAPublicKey):
        return RSAKey.import_key(pem)
    if isinstance(loaded, ec.EllipticCurvePublicKey):
        return ECKey.import_key(pem)
    raise ValueError(f"not an RSA or EC public key: {type(loaded).__name__}")


def _allowed_scope(allowed: Collection[str] | None, requested: str | None) -> str | None:
    """The scope to grant: all that was asked if all of it is allowed, else None (authlib's
    BearerTokenGenerator then answers invalid_scope)."""
    if not requested:
        return ""
    if allowed is None or set(scope_to_list(requested)) <= set(allowed):
        return requested
    return None


class _RegisteredClient(ClientMixin):
    def __init__(self, client_id: str, spec: Client) -> None:
        self.client_id = client_id
        self.spec = spec
        self.key: Key | None = None  # what verifies its client assertions
        if spec.auth_method == "private_key_jwt":
            if spec.public_key_pem is None:
                raise ValueError(f"{client_id}: private_key_jwt needs public_key_pem")
            self.key = _public_key(spec.public_key_pem)
        elif spec.auth_method != "tls_client_auth":
            if spec.secret is None:
                raise ValueError(f"{client_id}: {spec.auth_method} needs a secret")
            if spec.auth_method == "client_secret_jwt":
                self.key = OctKey.import_key(spec.secret)

    def get_client_id(self) -> str:
        return self.client_id

    def get_allowed_scope(self, scope: str | None) -> str | None:
        return _allowed_scope(self.spec.scopes, scope)

    def check_client_secret(self, client_secret: str) -> bool:
        secret = self.spec.secret
        return secret is not None and hmac.compare_digest(secret.encode(), client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if method == JWTBearerClientAssertion.CLIENT_AUTH_METHOD:
            return self.spec.auth_method in _JWT_AUTH_METHODS
        return method == self.spec.auth_method

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.spec.grant_types


class _IssuerClient(ClientMixin):
    """The "client" authlib's JWTBearerGrant resolves from an assertion's ``iss``."""

    def __init__(self, issuer: str, spec: Issuer) -> None:
        self.client_id = issuer
        self.spec = spec
        self.key = _public_key(spec.public_key_pem)

    def get_client_id(self) -> str:
        return self.client_id

    def get_allowed_scope(self, scope: str | None) -> str | None:
        return _allowed_scope(self.spec.scopes, scope)

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == JWT_BEARER

    def allows_subject(self, subject: str) -> bool:
        return self.spec.subjects is None or subject in self.spec.subjects


class _OAuth2Request(OAuth2Request):
    """authlib's request, made from one of ours (authlib reads ``form`` and ``payload``)."""

    def __init__(self, base_url: str, http: _HttpRequest) -> None:
        super().__init__(http.method, base_url + http.path, headers=http.headers)
        self.http = http
        self._form: dict[str, str] = {}
        if http.headers.get_content_type() == "application/x-www-form-urlencoded":
            for name, value in parse_qsl(http.body.decode(), keep_blank_values=True):
                self._form.setdefault(name, value)
        self.payload = BasicOAuth2Payload(self._form)
        self.assertion: Jwt | None = None
        self.client_assertion: Jwt | None = None
        self.peer_cn = _subject_cn(http.peer_cert)

    @property
    def form(self) -> dict[str, str]:
        return self._form

    @property
    def args(self) -> dict[str, str]:
        return dict(parse_qsl(self.http.query))


def _subject_cn(cert: dict[str, Any] | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


class _TokenEndpoint(AuthorizationServer):
    """authlib's AuthorizationServer on this module's HTTP server (what authlib's Flask and
    Django integrations do for theirs)."""

    def __init__(
        self,
        token_url: str,
        clients: Mapping[str, ClientMixin],
        issuers: Mapping[str, _IssuerClient],
        expires_in: int,
    ) -> None:
        super().__init__()
        self.token_url = token_url
        self.audiences = [token_url]
        self.clients = clients
        self.issuers = issuers
        generator = BearerTokenGenerator(
            lambda **_: generate_token(42), expires_generator=expires_in
        )
        self.register_token_generator("default", generator)

    def query_client(self, client_id: str) -> ClientMixin | None:
        return self.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        pass

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def create_oauth2_request(self, request: _OAuth2Request) -> _OAuth2Request:
        return request  # made by _OAuthServer._respond, which keeps it for the record

    def handle_response(
        self, status_code: int, payload: Any, headers: list[tuple[str, str]]
    ) -> _HttpResponse:
        body = json.dumps(payload) if isinstance(payload, dict) else str(payload)
        return _HttpResponse(status_code, body.encode(), list(headers))


class _JWTBearerGrant(JWTBearerGrant):
    """RFC 7523 §2.1. authlib verifies the signature with the issuer's key, then iss, aud and
    exp (essential), iat and nbf (if present), with 60 s leeway; ``sub``, if present, must name
    a user the issuer has permission for."""

    server: _TokenEndpoint
    request: _OAuth2Request

    def get_audiences(self) -> list[str]:
        return self.server.audiences

    def resolve_issuer_client(self, issuer: str) -> _IssuerClient | None:
        return self.server.issuers.get(issuer)

    def resolve_client_public_key(self, client: _IssuerClient) -> Key:
        return client.key

    def authenticate_user(self, subject: str) -> str:
        return subject  # any subject names a user; has_granted_permission decides

    def has_granted_permission(self, client: _IssuerClient, user: str) -> bool:
        return client.allows_subject(user)

    def process_assertion_claims(self, assertion: str) -> dict[str, Any]:
        claims: dict[str, Any] = super().process_assertion_claims(assertion)
        header, _ = self.extract_assertion(assertion)
        self.request.assertion = Jwt(dict(header), dict(claims))
        return claims


class _ClientAssertion(JWTBearerClientAssertion):
    """RFC 7523 §2.2 client authentication. authlib finds the client by ``sub``, verifies the
    signature with ``resolve_client_public_key``, then iss, sub (equal), aud, exp and jti.
    The client's registration says which of private_key_jwt / client_secret_jwt it uses, hence
    its key: its public key, or its secret as an HMAC key (never both: no algorithm confusion)."""

    def __init__(self, endpoint: _TokenEndpoint) -> None:
        super().__init__(validate_jti=True, leeway=60)
        self._endpoint = endpoint
        self._seen: set[tuple[str, str]] = set()
        self._seen_lock = threading.Lock()

    def get_audiences(self) -> list[str]:
        return self._endpoint.audiences

    def resolve_client_public_key(self, client: _RegisteredClient) -> Key:
        if client.key is None:
            raise InvalidClientError(description="The client has no assertion key.")
        return client.key

    def validate_jti(self, claims: Mapping[str, Any], jti: str) -> bool:
        with self._seen_lock:
            seen = (claims["sub"], jti) in self._seen
            self._seen.add((claims["sub"], jti))
        return not seen

    def __call__(self, query_client: Any, request: _OAuth2Request) -> ClientMixin | None:
        client = super().__call__(query_client, request)
        if client is None:
            return None
        # RFC 7521 §4.2: a client_id sent along MUST identify the client; authlib ignores it.
        if request.form.get("client_id", client.get_client_id()) != client.get_client_id():
            raise InvalidClientError(description="client_id does not match the assertion.")
        header, claims = self.extract_assertion(request.form["client_assertion"])
        request.client_assertion = Jwt(dict(header), dict(claims))
        return client


class _ClientCredentialsGrant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [
        "client_secret_basic",
        "client_secret_post",
        JWTBearerClientAssertion.CLIENT_AUTH_METHOD,
    ]


class _MtlsClientCredentialsGrant(ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["tls_client_auth"]


def _detect_auth_method(request: _OAuth2Request) -> str | None:
    form, found = request.form, []
    if (request.http.headers.get("Authorization") or "").lower().startswith("basic "):
        found.append("client_secret_basic")
    if "client_secret" in form:
        found.append("client_secret_post")
    if form.get("client_assertion_type") == CLIENT_ASSERTION_TYPE:
        alg = _unverified_alg(form.get("client_assertion", ""))
        found.append("client_secret_jwt" if alg.startswith("HS") else "private_key_jwt")
    if not found and request.peer_cn is not None:
        found.append("tls_client_auth")
    if not found and "client_id" in form:
        found.append("none")
    return "+".join(found) or None


def _unverified_alg(assertion: str) -> str:
    try:
        return str(jws.extract_compact(assertion.encode()).headers().get("alg", ""))
    except (JoseError, ValueError):
        return ""


class _OAuthServer(_Server[TokenRequest]):
    """A token endpoint at ``/token`` answered by authlib (subclasses set ``_authlib``)."""

    _authlib: _TokenEndpoint

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context)
        self.token_url = f"{self.url}/token"

    def _respond(self, http: _HttpRequest) -> _HttpResponse:
        if http.path != "/token":
            return _json_response(404, {"error": "not_found"})
        request = _OAuth2Request(self.url, http)
        response: _HttpResponse = self._authlib.create_token_response(request)
        issued = response.status == 200 and request.client is not None
        body = response.json()
        self._record(
            TokenRequest(
                method=http.method,
                path=http.path,
                grant_type=request.form.get("grant_type"),
                auth_method=_detect_auth_method(request),
                client_id=request.client.get_client_id() if issued else None,
                form={k: v for k, v in request.form.items() if k not in _SECRET_FIELDS},
                assertion=request.assertion,
                client_assertion=request.client_assertion,
                peer_cn=request.peer_cn,
                status=response.status,
                error=body.get("error") if isinstance(body, dict) else None,
            )
        )
        return response


# --- The servers ----------------------------------------------------------------------------


class AssertionServer(_OAuthServer):
    """An OAuth 2 token endpoint (``.token_url``) on authlib: grants JWT bearer (RFC 7523 §2.1,
    for ``issuers``) and client credentials (for ``clients``); client authentication
    client_secret_basic, client_secret_post, private_key_jwt, client_secret_jwt.

    Assertions must name ``.audiences`` in ``aud``: the token URL, unless a test changes it
    (e.g. appends ``.url`` for a Salesforce-style audience).
    """

    def __init__(
        self,
        *,
        clients: Mapping[str, Client] | None = None,
        issuers: Mapping[str, Issuer] | None = None,
        expires_in: int = 300,
    ) -> None:
        registered = {cid: _RegisteredClient(cid, spec) for cid, spec in (clients or {}).items()}
        trusted = {iss: _IssuerClient(iss, spec) for iss, spec in (issuers or {}).items()}
        super().__init__()
        self._authlib = _TokenEndpoint(self.token_url, registered, trusted, expires_in)
        self._authlib.register_client_auth_method(
            JWTBearerClientAssertion.CLIENT_AUTH_METHOD, _ClientAssertion(self._authlib)
        )
        self._authlib.register_grant(_JWTBearerGrant)
        self._authlib.register_grant(_ClientCredentialsGrant)
        self.audiences = self._authlib.audiences
        self._start()


class MtlsServer(_OAuthServer):
    """HTTPS (server certificate from ``ca``) that completes a TLS handshake only with a client
    certificate ``ca`` issued, serving client credentials with RFC 8705 §2.1 tls_client_auth:
    the form's client_id must be ``client_id`` and the certificate's subject CN
    ``expected_subject_cn``, else 401 invalid_client."""

    def __init__(
        self,
        ca: TestCA,
        *,
        client_id: str,
        expected_subject_cn: str,
        expires_in: int = 300,
    ) -> None:
        self.client_id = client_id
        self.expected_subject_cn = expected_subject_cn
        super().__init__(_server_context(ca))
        client = _RegisteredClient(client_id, Client(auth_method="tls_client_auth"))
        self._authlib = _TokenEndpoint(self.token_url, {client_id: client}, {}, expires_in)
        self._authlib.register_client_auth_method("tls_client_auth", self._tls_client_auth)
        self._authlib.register_grant(_MtlsClientCredentialsGrant)
        self._start()

    def _tls_client_auth(self, query_client: Any, request: _OAuth2Request) -> ClientMixin:
        client = query_client(request.form.get("client_id", ""))
        if client is None:
            raise InvalidClientError(status_code=401, description="Unknown client_id.")
        if request.peer_cn != self.expected_subject_cn:
            raise InvalidClientError(
                status_code=401, description="The client certificate does not match the client."
            )
        return client


def _server_context(ca: TestCA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=ca.cert_pem)
    context.verify_mode = ssl.CERT_REQUIRED
    cert_pem, key_pem = ca.issue("127.0.0.1", server=True)
    with tempfile.TemporaryDirectory() as directory:  # ssl loads a chain from files only
        cert, key = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert.write_text(cert_pem)
        key.write_text(key_pem)
        context.load_cert_chain(cert, key)
    return context


_GITHUB_DOCS = (
    "https://docs.github.com/rest/apps/apps#create-an-installation-access-token-for-an-app"
)
_ACCESS_TOKENS = re.compile(r"/app/installations/(\d+)/access_tokens")
_TOKEN_ALPHABET = string.ascii_letters + string.digits
DEFAULT_GITHUB_PERMISSIONS = {"contents": "read", "metadata": "read"}


class _GitHubError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class GitHubAppServer(_Server[GitHubRequest]):
    """``POST {url}/app/installations/{id}/access_tokens`` as GitHub answers it, for one app.

    The app JWT (``Authorization: Bearer``) must verify with ``public_key_pem`` as RS256, and
    have ``iss`` the app id (number or string), ``iat`` no more than 60 s ahead, ``exp`` in the
    future and no more than 10 minutes ahead (GitHub's documented limits). Answers 201 with
    ``token`` (``ghs_`` + 36 characters), ``expires_at`` (an hour ahead), ``permissions`` (those
    asked for, else ``DEFAULT_GITHUB_PERMISSIONS``) and ``repository_selection``; 401 for a
    missing or refused JWT, 404 for an installation not in ``installations`` (or another path),
    403 without a User-Agent (GitHub requires one), 400 for a body that is not JSON, 422 for
    one of the wrong shape.
    """

    def __init__(
        self, *, app_id: str | int, public_key_pem: str, installations: Collection[int]
    ) -> None:
        self.app_id = str(app_id)
        self._key = RSAKey.import_key(public_key_pem)
        self.installations = set(installations)
        super().__init__()
        self._start()

    def access_tokens_url(self, installation_id: int) -> str:
        return f"{self.url}/app/installations/{installation_id}/access_tokens"

    def _respond(self, http: _HttpRequest) -> _HttpResponse:
        match = _ACCESS_TOKENS.fullmatch(http.path)
        installation_id = int(match.group(1)) if match else None
        app_jwt: Jwt | None = None
        body, malformed = _json_body(http.body)
        try:
            if installation_id is None or http.method != "POST":
                raise _GitHubError(404, "Not Found")
            if not http.headers.get("User-Agent"):
                raise _GitHubError(403, "Request forbidden by administrative rules.")
            app_jwt = self._verify(http.headers.get("Authorization"))
            self._check_claims(app_jwt.claims)
            if installation_id not in self.installations:
                raise _GitHubError(404, "Not Found")
            if malformed:
                raise _GitHubError(400, "Problems parsing JSON")
            status, answer = 201, self._access_token(body)
        except _GitHubError as error:
            status, answer = (
                error.status,
                {"message": error.message, "documentation_url": _GITHUB_DOCS},
            )
        self._record(
            GitHubRequest(
                method=http.method,
                path=http.path,
                installation_id=installation_id,
                jwt=app_jwt,
                body=body,
                headers={k: v for k, v in http.headers.items() if k.lower() != "authorization"},
                status=status,
                message=answer.get("message") if status >= 400 else None,
            )
        )
        return _json_response(status, answer)

    def _verify(self, authorization: str | None) -> Jwt:
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials:
            raise _GitHubError(401, "Requires authentication")
        try:
            token = jwt.decode(credentials.strip(), self._key, algorithms=["RS256"])
        except (JoseError, ValueError) as error:
            raise _GitHubError(401, "A JSON web token could not be decoded") from error
        return Jwt(dict(token.header), dict(token.claims))

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now = time.time()
        iss, iat, exp = claims.get("iss"), claims.get("iat"), claims.get("exp")
        if isinstance(iss, bool) or not isinstance(iss, int | str) or str(iss) != self.app_id:
            raise _GitHubError(401, "'Issuer' claim ('iss') must be the app's ID")
        if not _is_number(iat) or iat > now + 60:
            raise _GitHubError(
                401,
                "'Issued at' claim ('iat') must be an Integer representing the time that the"
                " assertion was issued",
            )
        if not _is_number(exp) or exp <= now:
            raise _GitHubError(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the"
                " future time at which the assertion expires",
            )
        if exp > now + 600:
            raise _GitHubError(401, "'Expiration time' claim ('exp') is too far in the future")

    def _access_token(self, body: Any) -> dict[str, Any]:
        asked = {} if body is None else body
        if not isinstance(asked, dict):
            raise _GitHubError(422, "Invalid request.")
        repositories, permissions = asked.get("repositories"), asked.get("permissions")
        if not (repositories is None or _is_list_of_str(repositories)):
            raise _GitHubError(422, "Invalid request.")
        if not (permissions is None or isinstance(permissions, dict)):
            raise _GitHubError(422, "Invalid request.")
        expires_at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        answer: dict[str, Any] = {
            "token": "ghs_" + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(36)),
            "expires_at": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "permissions": permissions or dict(DEFAULT_GITHUB_PERMISSIONS),
            "repository_selection": "all" if repositories is None else "selected",
        }
        if repositories is not None:
            answer["repositories"] = [{"name": name} for name in repositories]
        return answer


def _json_body(body: bytes) -> tuple[Any, bool]:
    """The JSON value of a body (None if empty), and whether it was malformed."""
    try:
        return (json.loads(body) if body.strip() else None), False
    except ValueError:
        return None, True


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "DEFAULT_GITHUB_PERMISSIONS",
    "JWT_BEARER",
    "AssertionServer",
    "Client",
    "GitHubAppServer",
    "GitHubRequest",
    "Issuer",
    "Jwt",
    "MtlsServer",
    "TokenRequest",
]
