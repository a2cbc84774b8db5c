from __future__ import annotations

import hmac

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from tokens import connect, monitoring, selectors
from tokens.conf import tokens_settings
from tokens.status import schedule_is_healthy


def _allowed(request: HttpRequest) -> bool:
    access = tokens_settings.MONITORING_ACCESS
    if access == "open":
        return True
    if access == "key":
        key = tokens_settings.MONITORING_KEY
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return bool(key) and hmac.compare_digest(given.encode(), key.encode())
    # Provider names, kinds and their errors are what view_provider shows in admin: the same
    # permission, not just a staff flag.
    user = getattr(request, "user", None)
    return bool(user and user.is_active and user.is_staff and user.has_perm("tokens.view_provider"))


def _denied() -> JsonResponse:
    return JsonResponse({"detail": "forbidden"}, status=403)


# Health lists at most this many providers that need attention (the first by name).
HEALTH_LISTED = 100


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    """200 when every enabled provider has a valid token and none needs reconnecting, and the
    schedule runs (beat's dispatcher entry is there and enabled, no provider overdue), 503
    otherwise. A summary (providers counted by status) and the providers that need attention,
    at most HEALTH_LISTED of them: never every provider. Never shows a token, a fingerprint or
    a secret."""
    if not _allowed(request):
        return _denied()
    now = timezone.now()
    summary = selectors.provider_summary(now=now)
    listed = selectors.providers_needing_attention(limit=HEALTH_LISTED, now=now)
    schedule = selectors.schedule_report(now=now)
    healthy = summary.unhealthy == 0 and schedule_is_healthy(schedule)
    body = {
        "status": "ok" if healthy else "unhealthy",
        "checked_at": now.isoformat(),
        "schedule": schedule,
        "summary": {
            "providers": summary.total,
            "by_status": {status.value: count for status, count in summary.by_status.items()},
            "needing_attention": summary.needing_attention,
            "making_unhealthy": summary.unhealthy,
        },
        "providers": selectors.provider_report(providers=listed, now=now),
        "providers_not_listed": max(0, summary.needing_attention - len(listed)),
    }
    response = JsonResponse(body, status=200 if healthy else 503)
    # An unhealthy answer is the endpoint doing its job, not a server error to log.
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response


@require_GET
def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    if not _allowed(request):
        return _denied()
    return HttpResponse(monitoring.exposition(), content_type="text/plain; version=0.0.4")


@never_cache
@require_GET
def connect_callback(request: HttpRequest) -> HttpResponse:
    """Where the identity provider sends the admin user back after "Connect"."""
    user = getattr(request, "user", None)
    if not (user and user.is_active and user.is_staff and user.has_perm("tokens.change_provider")):
        return JsonResponse(
            {"detail": "log in to admin as a user who may change providers, then Connect again"},
            status=403,
        )
    outcome = connect.connect_finish(request)
    messages.add_message(
        request, messages.SUCCESS if outcome.ok else messages.ERROR, outcome.message
    )
    if outcome.provider_id is None:
        return HttpResponseRedirect(reverse("admin:tokens_provider_changelist"))
    return HttpResponseRedirect(reverse("admin:tokens_provider_change", args=[outcome.provider_id]))
