"""Examples: calling a protected API with a token, from a sync and from an async view.

EXAMPLE_API_URL is the API; EXAMPLE_TOKEN_PROVIDER names the provider whose token it takes. Code
like this gets copied, so it shows the safe shape: only logged-in users may trigger a call, and
the caller gets the upstream status and nothing else. An upstream body may echo the request's
Authorization header, and a refresh error names the provider's problems: both go to the log,
never into the response. (Mounted only with DJANGO_DEBUG or EXAMPLE_VIEWS; see urls.py.)
"""

from __future__ import annotations

import logging

import httpx
import requests
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, JsonResponse

from tokens import TokenError
from tokens.auth import HttpxTokenAuth, RequestsTokenAuth

logger = logging.getLogger(__name__)

UNAVAILABLE = {"error": "the API's token is unavailable; see the server log"}


def _answer(status: int) -> JsonResponse:
    return JsonResponse({"upstream_status": status, "ok": 200 <= status < 300})


def _unavailable(error: TokenError) -> JsonResponse:
    logger.warning("example: no token for the API call: %s", error)  # messages are scrubbed
    return JsonResponse(UNAVAILABLE, status=503)


@login_required
def call_api(request: HttpRequest) -> JsonResponse:
    """Sync: requests with RequestsTokenAuth (adds the header, retries once on a 401)."""
    try:
        response = requests.get(
            settings.EXAMPLE_API_URL,
            auth=RequestsTokenAuth(settings.EXAMPLE_TOKEN_PROVIDER, timeout=5),
            timeout=10,
        )
    except TokenError as error:
        return _unavailable(error)
    logger.info("example: API answered HTTP %s", response.status_code)
    return _answer(response.status_code)


@login_required
async def call_api_async(request: HttpRequest) -> JsonResponse:
    """Async: httpx.AsyncClient with HttpxTokenAuth; waiting never blocks the event loop."""
    try:
        async with httpx.AsyncClient(
            auth=HttpxTokenAuth(settings.EXAMPLE_TOKEN_PROVIDER, timeout=5), timeout=10
        ) as client:
            response = await client.get(settings.EXAMPLE_API_URL)
    except TokenError as error:
        return _unavailable(error)
    logger.info("example: API answered HTTP %s", response.status_code)
    return _answer(response.status_code)
