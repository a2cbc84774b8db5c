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


def _valid_q(now: datetime) -> Q:
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


def with_status(
    providers: QuerySet[Provider], status: Status, *, refreshing: set[int], now: datetime
) -> QuerySet[Provider]:
    """``providers`` whose status is ``status``: ``status_of`` as database filters, in the same
    order of precedence (disabled, refreshing, reconnect, failing, ok, never, expired)."""
    if status == Status.DISABLED:
        return providers.filter(enabled=False)
    enabled = providers.filter(enabled=True)
    if status == Status.REFRESHING:
        return enabled.filter(pk__in=refreshing)
    enabled = enabled.exclude(pk__in=refreshing)
    if status == Status.RECONNECT:
        return enabled.filter(_RECONNECT_Q)
    if status == Status.FAILING:
        return enabled.filter(_FAILING_Q).exclude(_RECONNECT_Q)
    if status == Status.OK:
        return enabled.filter(_valid_q(now)).exclude(_FAILING_Q)
    if status == Status.NEVER:
        return enabled.filter(_NEVER_Q).exclude(_FAILING_Q).exclude(_valid_q(now))
    return enabled.exclude(_FAILING_Q).exclude(_valid_q(now)).exclude(_NEVER_Q)


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
