"""A provider's status as operators see it (admin badge, health endpoint, metrics)."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.utils import timezone

from tokens import store
from tokens.models import Provider, ProviderState


class Status(enum.StrEnum):
    OK = "ok"
    REFRESHING = "refreshing"
    FAILING = "failing"
    EXPIRED = "expired"
    NEVER = "never"
    DISABLED = "disabled"


def has_valid_token(state: ProviderState | None, now: datetime) -> bool:
    if state is None or state.last_refresh_at is None:
        return False
    return state.expires_at is None or state.expires_at > now


def status_of(
    provider: Provider, state: ProviderState | None, *, refreshing: bool, now: datetime
) -> Status:
    if not provider.enabled:
        return Status.DISABLED
    if refreshing:
        return Status.REFRESHING
    if state is not None and state.consecutive_failures:
        return Status.FAILING
    if has_valid_token(state, now):
        return Status.OK
    if state is None or (state.last_attempt_at is None and state.current_version == 0):
        return Status.NEVER
    return Status.EXPIRED


def refreshing_ids(provider_ids: Iterable[int]) -> set[int]:
    """The providers whose refresh lock is held right now (empty when Redis is unreachable)."""
    ids = list(provider_ids)
    if not ids:
        return set()
    try:
        held = store.locks_held(ids)
    except store.StoreError:
        return set()
    return {pid for pid, is_held in zip(ids, held, strict=True) if is_held}


def state_or_none(provider: Provider) -> ProviderState | None:
    try:
        return provider.refresh_state
    except ProviderState.DoesNotExist:
        return None


def provider_report(*, now: datetime | None = None) -> list[dict[str, object]]:
    """Per-provider status for monitoring: never a token, a fingerprint or a secret."""
    now = now or timezone.now()
    providers = list(Provider.objects.select_related("refresh_state").order_by("name"))
    refreshing = refreshing_ids(p.pk for p in providers)
    report: list[dict[str, object]] = []
    for provider in providers:
        state = state_or_none(provider)
        valid = has_valid_token(state, now)
        expires_in = None
        if valid and state is not None and state.expires_at is not None:
            expires_in = round((state.expires_at - now).total_seconds(), 1)
        report.append(
            {
                "name": provider.name,
                "kind": provider.kind,
                "enabled": provider.enabled,
                "status": str(
                    status_of(provider, state, refreshing=provider.pk in refreshing, now=now)
                ),
                "valid": valid,
                "expires_in_seconds": expires_in,
                "last_refresh": state.last_refresh_at.isoformat()
                if state and state.last_refresh_at
                else None,
                "consecutive_failures": state.consecutive_failures if state else 0,
                "last_error": state.last_error if state else "",
            }
        )
    return report


# A provider whose scheduled run is older than this was not claimed: beat or the workers are down.
OVERDUE_AFTER = timedelta(seconds=60)


def schedule_report(*, now: datetime | None = None) -> dict[str, object]:
    """Whether the schedule runs: beat's dispatcher entry, and providers overdue by over a
    minute (nothing claims them: beat, or every worker, is down)."""
    from django_celery_beat.models import PeriodicTask

    from tokens.services import DISPATCH_SCHEDULE

    now = now or timezone.now()
    entry = PeriodicTask.objects.filter(name=DISPATCH_SCHEDULE).first()
    overdue = ProviderState.objects.filter(
        provider__enabled=True, next_run_at__lt=now - OVERDUE_AFTER
    )
    oldest = overdue.order_by("next_run_at").values_list("next_run_at", flat=True).first()
    return {
        "dispatcher": "missing" if entry is None else "ok" if entry.enabled else "disabled",
        "overdue_providers": overdue.count(),
        "oldest_overdue_since": oldest.isoformat() if oldest else None,
    }


def schedule_is_healthy(report: dict[str, object]) -> bool:
    return report["dispatcher"] == "ok" and report["overdue_providers"] == 0
