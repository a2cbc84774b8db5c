"""Authorization for outbound calls: httpx and requests auth that add the provider's token and,
when the API answers 401, report the token and retry once with a fresh one.

The token is bound to the origin (scheme, host, port) of the request it was first added to: a
401 from anywhere else (the target of a redirect) neither voids it nor earns a retry, and a retry
only ever goes back to that origin. invalidate_token() itself is rate-bounded per provider.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any
from urllib.parse import urlsplit

import httpx
import requests

from tokens.api import (
    aget_token_with_type,
    ainvalidate_token,
    get_token_with_type,
    invalidate_token,
)

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: object) -> tuple[str, str, int | None]:
    """(scheme, host, port) of ``url``, the default port filled in."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)


def _header(token: str, token_type: str) -> str:
    return f"{token_type} {token}"


def _rejects(status: int, url: object, headers: Any, home: object, token: str) -> bool:
    """Whether a response rejects ``token``: a 401 from the token's own origin to a request
    that carried it."""
    sent = str(headers.get("Authorization") or "")
    return status == 401 and origin(url) == home and sent.endswith(f" {token}")


class HttpxTokenAuth(httpx.Auth):
    """``httpx.Client(auth=HttpxTokenAuth("payments"))``; works with AsyncClient too."""

    def __init__(self, provider: str, *, timeout: float | None = None) -> None:
        self.provider = provider
        self.timeout = timeout

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        home = origin(request.url)
        token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
        request.headers["Authorization"] = _header(token, token_type)
        response = yield request
        # After redirects the response may come from elsewhere, or from home by a request that
        # no longer carried our header (dropped on the way): such a 401 says nothing of ours.
        if _rejects(response.status_code, response.url, response.request.headers, home, token):
            invalidate_token(self.provider, token)
            fresh, token_type = get_token_with_type(self.provider, timeout=self.timeout)
            if fresh != token:
                request.headers["Authorization"] = _header(fresh, token_type)
                yield request  # the original request: to the token's own origin

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        home = origin(request.url)
        token, token_type = await aget_token_with_type(self.provider, timeout=self.timeout)
        request.headers["Authorization"] = _header(token, token_type)
        response = yield request
        if _rejects(response.status_code, response.url, response.request.headers, home, token):
            await ainvalidate_token(self.provider, token)
            fresh, token_type = await aget_token_with_type(self.provider, timeout=self.timeout)
            if fresh != token:
                request.headers["Authorization"] = _header(fresh, token_type)
                yield request


class RequestsTokenAuth(requests.auth.AuthBase):
    """``requests.get(url, auth=RequestsTokenAuth("payments"))``."""

    def __init__(self, provider: str, *, timeout: float | None = None) -> None:
        self.provider = provider
        self.timeout = timeout

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
        request.headers["Authorization"] = _header(token, token_type)
        request.register_hook("response", self._retry_on_401(token, origin(request.url)))
        return request

    def _retry_on_401(self, sent_token: str, home: tuple[str, str, int | None]) -> Any:
        def hook(response: requests.Response, **kwargs: Any) -> requests.Response:
            if response.status_code != 401 or getattr(response.request, "_tokens_retry", False):
                return response
            # requests runs this hook for every hop of a redirect too: a 401 from another
            # origin, or to a request that no longer carried our header, is not about our
            # token, and must not be answered with a fresh one.
            headers = response.request.headers
            if not _rejects(401, response.request.url, headers, home, sent_token):
                return response
            invalidate_token(self.provider, sent_token)
            token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
            if token == sent_token:
                return response  # nothing new to try
            response.content  # noqa: B018 - read the body so the connection can be reused
            response.close()
            retry = response.request.copy()
            retry.headers["Authorization"] = _header(token, token_type)
            retry._tokens_retry = True  # type: ignore[attr-defined]
            retry.hooks = {"response": []}
            new = response.connection.send(retry, **kwargs)
            new.history.append(response)
            new.request = retry
            return new

        return hook
