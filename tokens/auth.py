"""Authorization for outbound calls: httpx and requests auth that add the provider's token and,
when the API answers 401, report the token and retry once with a fresh one."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx
import requests

from tokens.api import (
    aget_token_with_type,
    ainvalidate_token,
    get_token_with_type,
    invalidate_token,
)


def _header(token: str, token_type: str) -> str:
    return f"{token_type} {token}"


class HttpxTokenAuth(httpx.Auth):
    """``httpx.Client(auth=HttpxTokenAuth("payments"))``; works with AsyncClient too."""

    def __init__(self, provider: str, *, timeout: float | None = None) -> None:
        self.provider = provider
        self.timeout = timeout

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
        request.headers["Authorization"] = _header(token, token_type)
        response = yield request
        if response.status_code == 401:
            invalidate_token(self.provider, token)
            token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
            request.headers["Authorization"] = _header(token, token_type)
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token, token_type = await aget_token_with_type(self.provider, timeout=self.timeout)
        request.headers["Authorization"] = _header(token, token_type)
        response = yield request
        if response.status_code == 401:
            await ainvalidate_token(self.provider, token)
            token, token_type = await aget_token_with_type(self.provider, timeout=self.timeout)
            request.headers["Authorization"] = _header(token, token_type)
            yield request


class RequestsTokenAuth(requests.auth.AuthBase):
    """``requests.get(url, auth=RequestsTokenAuth("payments"))``."""

    def __init__(self, provider: str, *, timeout: float | None = None) -> None:
        self.provider = provider
        self.timeout = timeout

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
        request.headers["Authorization"] = _header(token, token_type)
        request.register_hook("response", self._retry_on_401(token))
        return request

    def _retry_on_401(self, sent_token: str) -> Any:
        def hook(response: requests.Response, **kwargs: Any) -> requests.Response:
            if response.status_code != 401 or getattr(response.request, "_tokens_retry", False):
                return response
            invalidate_token(self.provider, sent_token)
            token, token_type = get_token_with_type(self.provider, timeout=self.timeout)
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
