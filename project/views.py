"""Examples: calling a protected API with a token, from a sync and from an async view.

EXAMPLE_API_URL is the API; EXAMPLE_TOKEN_PROVIDER names the provider whose token it takes.
"""

from __future__ import annotations

import httpx
import requests
from django.conf import settings
from django.http import HttpRequest, JsonResponse

from tokens import TokenError
from tokens.auth import HttpxTokenAuth, RequestsTokenAuth


def call_api(request: HttpRequest) -> JsonResponse:
    """Sync: requests with RequestsTokenAuth (adds the header, retries once on 401)."""
    try:
        response = requests.get(
            settings.EXAMPLE_API_URL,
            auth=RequestsTokenAuth(settings.EXAMPLE_TOKEN_PROVIDER, timeout=5),
            timeout=10,
        )
    except TokenError as error:
        return JsonResponse({"error": str(error)}, status=503)
    return JsonResponse({"status": response.status_code, "body": response.text[:200]})


async def call_api_async(request: HttpRequest) -> JsonResponse:
    """Async: httpx.AsyncClient with HttpxTokenAuth; waiting never blocks the event loop."""
    try:
        async with httpx.AsyncClient(
            auth=HttpxTokenAuth(settings.EXAMPLE_TOKEN_PROVIDER, timeout=5), timeout=10
        ) as client:
            response = await client.get(settings.EXAMPLE_API_URL)
    except TokenError as error:
        return JsonResponse({"error": str(error)}, status=503)
    return JsonResponse({"status": response.status_code, "body": response.text[:200]})
