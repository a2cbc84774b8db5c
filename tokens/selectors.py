"""The database reads more than one caller needs: the read path, the refresh's inputs, the
reports of health and metrics, and the stored ciphertexts the start-up check and key rotation
look at."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, F, Min, Q, TextField
from django.db.models.functions import Cast
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from tokens.constants import DISPATCH_ENTRY
from tokens.exceptions import ProviderDisabled, UnknownProvider
from tokens.models import Provider, ProviderState, Token
from tokens.status import (
    Status,
    has_valid_token,
    makes_unhealthy_q,
    needs_attention_q,
    refreshing_all,
    refreshing_ids,
    status_of,
    status_q,
    valid_q,
)

# A provider whose scheduled run is older than this was not claimed: beat or the workers are down.
OVERDUE_AFTER = timedelta(seconds=60)


def provider_for_reading(*, name: str) -> Provider:
    """The enabled provider called ``name``; UnknownProvider or ProviderDisabled otherwise."""
    provider = Provider.objects.filter(name=name).first()
    if provider is None:
        raise UnknownProvider(name)
    if not provider.enabled:
        raise ProviderDisabled(name)
    return provider


def provider_for_reading_with_state(*, name: str) -> Provider:
    """provider_for_reading(), with the provider's refresh state (``state_or_none``) read in the
    same query: get_token()'s cold path decides from it, in one round trip."""
    provider = Provider.objects.select_related("refresh_state").filter(name=name).first()
    if provider is None:
        raise UnknownProvider(name)
    if not provider.enabled:
        raise ProviderDisabled(name)
    return provider


def current_token(*, provider: Provider) -> Token | None:
    """The provider's current token if it is still valid (never an expired or voided one)."""
    current = ProviderState.objects.filter(provider_id=provider.pk).values_list(
        "current_version", flat=True
    )
    token = Token.objects.filter(provider=provider, version__in=current[:1]).first()
    usable_until = token.usable_until if token is not None else None
    if token is None or (usable_until is not None and usable_until <= timezone.now()):
        return None
    return token


def providers_for_refresh(*, provider_ids: list[int]) -> dict[int, Provider]:
    """The providers with their refresh state, in one query (by id)."""
    if not provider_ids:
        return {}
    return {
        provider.pk: provider
        for provider in Provider.objects.select_related("refresh_state").filter(pk__in=provider_ids)
    }


def provider_is_failing(*, provider_id: int) -> bool:
    """Whether the provider's last refresh failed."""
    return ProviderState.objects.filter(
        provider_id=provider_id, consecutive_failures__gt=0
    ).exists()


def provider_state(*, provider_id: int) -> ProviderState | None:
    """The provider's refresh state (None when it has none yet)."""
    return ProviderState.objects.filter(provider_id=provider_id).first()


def provider_names(*, provider_ids: list[int]) -> dict[int, str]:
    """The names of these providers, by id (those that still exist)."""
    return dict(Provider.objects.filter(pk__in=provider_ids).values_list("pk", "name"))


def provider_last_error(*, provider_id: int) -> str:
    """The provider's last refresh error (sanitized when it was stored), or ""."""
    error = (
        ProviderState.objects.filter(provider_id=provider_id)
        .values_list("last_error", flat=True)
        .first()
    )
    return error or ""


def provider_token_values(*, provider: Provider) -> list[str]:
    """Every token of the provider still stored (TOKENS_HISTORY): any may be echoed back."""
    return [token.value for token in Token.objects.filter(provider=provider)]


@dataclass(frozen=True)
class ProviderSummary:
    """Every provider counted (health, metrics): never a name."""

    total: int
    by_status: dict[Status, int]
    needing_attention: int  # status.needs_attention
    unhealthy: int  # status.makes_unhealthy
    soonest_expiry: datetime | None  # among enabled providers' valid tokens


def provider_summary(*, now: datetime | None = None) -> ProviderSummary:
    """Every provider counted by status, and the soonest expiry, in one pass over the table."""
    now = now or timezone.now()
    refreshing = refreshing_all()
    by_status = {
        status.value: Count("pk", filter=status_q(status, refreshing=refreshing, now=now))
        for status in Status
    }
    row = Provider.objects.aggregate(
        total=Count("pk"),
        needing_attention=Count("pk", filter=needs_attention_q(now)),
        unhealthy=Count("pk", filter=makes_unhealthy_q(now)),
        soonest_expiry=Min("refresh_state__expires_at", filter=Q(enabled=True) & valid_q(now)),
        **by_status,
    )
    return ProviderSummary(
        total=row["total"],
        by_status={status: row[status.value] for status in Status},
        needing_attention=row["needing_attention"],
        unhealthy=row["unhealthy"],
        soonest_expiry=row["soonest_expiry"],
    )


def providers_needing_attention(*, limit: int, now: datetime | None = None) -> list[Provider]:
    """The first ``limit`` providers by name that need attention (``needs_attention``), with
    their state."""
    return list(
        Provider.objects.select_related("refresh_state")
        .filter(needs_attention_q(now or timezone.now()))
        .order_by("name")[:limit]
    )


def provider_report(
    *, providers: list[Provider], now: datetime | None = None
) -> list[dict[str, object]]:
    """What monitoring shows of each of ``providers`` (read with their state): never a token,
    a fingerprint or a secret."""
    now = now or timezone.now()
    refreshing = refreshing_ids(p.pk for p in providers)
    report: list[dict[str, object]] = []
    for provider in providers:
        state = provider.state_or_none
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
                "reconnect_needed": bool(state and state.reconnect_needed),
                "last_error": state.last_error if state else "",
            }
        )
    return report


def providers_enabled_with_state() -> Iterator[Provider]:
    """Every enabled provider with its state, by name, streamed in chunks (not held in memory
    all at once)."""
    providers = Provider.objects.filter(enabled=True).select_related("refresh_state")
    return providers.order_by("name").iterator(chunk_size=2_000)


def schedule_has_due(*, now: datetime | None = None) -> bool:
    """Whether some enabled provider's scheduled refresh is due (what the dispatcher claims)."""
    return ProviderState.objects.filter(
        next_run_at__lte=now or timezone.now(), provider__enabled=True
    ).exists()


def dispatcher_entry() -> PeriodicTask | None:
    """Beat's one entry, the dispatcher (None when somebody deleted it)."""
    return PeriodicTask.objects.filter(name=DISPATCH_ENTRY).first()


def schedule_report(*, now: datetime | None = None) -> dict[str, object]:
    """Whether the schedule runs: beat's dispatcher entry, and providers overdue by over a
    minute (nothing claims them: beat, or every worker, is down)."""
    now = now or timezone.now()
    entry = dispatcher_entry()
    overdue = ProviderState.objects.filter(
        provider__enabled=True, next_run_at__lt=now - OVERDUE_AFTER
    )
    oldest = overdue.order_by("next_run_at").values_list("next_run_at", flat=True).first()
    return {
        "dispatcher": "missing" if entry is None else "ok" if entry.enabled else "disabled",
        "overdue_providers": overdue.count(),
        "oldest_overdue_since": oldest.isoformat() if oldest else None,
    }


def stored_ciphertexts(*, limit: int | None = None) -> Iterator[tuple[str, str]]:
    """(what it is, its ciphertext as stored) for each stored secret and token, newest first,
    up to ``limit`` of each: never decrypted here, so a wrong key cannot fail the read."""
    secrets = (
        Provider.objects.exclude(secret="")
        .annotate(raw=Cast(F("secret"), output_field=TextField()))
        .order_by("-pk")
        .values_list("name", "raw")
    )
    tokens = (
        Token.objects.annotate(raw=Cast(F("value"), output_field=TextField()))
        .order_by("-pk")
        .values_list("provider__name", "version", "raw")
    )
    if limit is not None:
        secrets, tokens = secrets[:limit], tokens[:limit]
    for name, raw in secrets.iterator():
        yield f"secret of {name}", raw
    for name, version, raw in tokens.iterator():
        yield f"token v{version} of {name}", raw
