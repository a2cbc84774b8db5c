"""A provider's status as operators see it (admin badge and filter, health, metrics): the rule
in Python for one provider and as a ``Q`` for a queryset, side by side."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db.models import Q, QuerySet

from tokens import locks
from tokens.models import Provider, ProviderState


class Status(enum.StrEnum):
    OK = "ok"
    REFRESHING = "refreshing"
    RECONNECT = "reconnect"
    FAILING = "failing"
    EXPIRED = "expired"
    NEVER = "never"
    DISABLED = "disabled"

    @property
    def label(self) -> str:
        """As operators read it."""
        return "reconnect needed" if self is Status.RECONNECT else self.value


def has_valid_token(state: ProviderState | None, now: datetime) -> bool:
    if state is None or state.last_refresh_at is None:
        return False
    return state.expires_at is None or state.expires_at > now


def valid_q(now: datetime) -> Q:
    """``has_valid_token`` as a filter on providers."""
    return Q(refresh_state__last_refresh_at__isnull=False) & (
        Q(refresh_state__expires_at__isnull=True) | Q(refresh_state__expires_at__gt=now)
    )


def status_of(
    provider: Provider, state: ProviderState | None, *, refreshing: bool, now: datetime
) -> Status:
    if not provider.enabled:
        return Status.DISABLED
    if refreshing:
        return Status.REFRESHING
    if state is not None and state.reconnect_needed:
        return Status.RECONNECT
    if state is not None and state.consecutive_failures:
        return Status.FAILING
    if has_valid_token(state, now):
        return Status.OK
    if state is None or (state.last_attempt_at is None and state.current_version == 0):
        return Status.NEVER
    return Status.EXPIRED


_RECONNECT_Q = Q(refresh_state__reconnect_needed=True)
_FAILING_Q = Q(refresh_state__consecutive_failures__gt=0) | _RECONNECT_Q
_NEVER_Q = Q(refresh_state__isnull=True) | Q(
    refresh_state__last_attempt_at__isnull=True, refresh_state__current_version=0
)


def status_q(status: Status, *, refreshing: set[int], now: datetime) -> Q:
    """``status_of`` as a filter on providers, in the same order of precedence (disabled,
    refreshing, reconnect, failing, ok, never, expired)."""
    if status == Status.DISABLED:
        return Q(enabled=False)
    if status == Status.REFRESHING:
        return Q(enabled=True, pk__in=refreshing)
    enabled = Q(enabled=True) & ~Q(pk__in=refreshing)
    if status == Status.RECONNECT:
        return enabled & _RECONNECT_Q
    if status == Status.FAILING:
        return enabled & _FAILING_Q & ~_RECONNECT_Q
    if status == Status.OK:
        return enabled & valid_q(now) & ~_FAILING_Q
    if status == Status.NEVER:
        return enabled & _NEVER_Q & ~_FAILING_Q & ~valid_q(now)
    return enabled & ~_FAILING_Q & ~valid_q(now) & ~_NEVER_Q


def with_status(
    providers: QuerySet[Provider], status: Status, *, refreshing: set[int], now: datetime
) -> QuerySet[Provider]:
    """``providers`` whose status is ``status`` (``status_q``)."""
    return providers.filter(status_q(status, refreshing=refreshing, now=now))


def needs_attention(provider: Provider, state: ProviderState | None, *, now: datetime) -> bool:
    """Whether an operator should look at the provider (health lists it): it is enabled and
    not ok, whether a refresh runs now or not: no valid token, failing or reconnect needed."""
    if not provider.enabled:
        return False
    failing = state is not None and (state.consecutive_failures > 0 or state.reconnect_needed)
    return failing or not has_valid_token(state, now)


def needs_attention_q(now: datetime) -> Q:
    """``needs_attention`` as a filter on providers."""
    return Q(enabled=True) & (~valid_q(now) | _FAILING_Q)


def makes_unhealthy(provider: Provider, state: ProviderState | None, *, now: datetime) -> bool:
    """Whether the provider turns health to 503: it is enabled and has no valid token, or its
    connected account must be connected again (a failing provider still serving its valid
    token does not)."""
    if not provider.enabled:
        return False
    return not has_valid_token(state, now) or bool(state and state.reconnect_needed)


def makes_unhealthy_q(now: datetime) -> Q:
    """``makes_unhealthy`` as a filter on providers."""
    return Q(enabled=True) & (~valid_q(now) | _RECONNECT_Q)


def fails_fast(state: ProviderState | None, *, now: datetime, deadline: datetime) -> bool:
    """Whether a reader with no valid token should fail at once rather than wait: the last
    refresh failed and nothing will change before ``deadline`` (a permanent error, or a retry
    more than 0.3 s away; one sooner is worth waiting for, and its failure wakes the reader:
    an error within a second either way)."""
    if state is None or not state.consecutive_failures:
        return False
    if state.permanent_error or state.next_attempt_at is None:
        return True
    return state.next_attempt_at > min(deadline, now + timedelta(seconds=0.3))


def refreshing_ids(provider_ids: Iterable[int]) -> set[int]:
    """The providers whose refresh lock is held right now (empty when Redis is unreachable)."""
    ids = list(provider_ids)
    return {pid for pid, held in zip(ids, locks.locks_held(ids), strict=True) if held}


def refreshing_all() -> set[int]:
    """Every provider whose refresh lock is held right now."""
    return locks.locks_held_ids()


def schedule_is_healthy(report: dict[str, object]) -> bool:
    return report["dispatcher"] == "ok" and report["overdue_providers"] == 0
