from __future__ import annotations

from datetime import timedelta

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from tokens import services
from tokens.forms import ProviderForm
from tokens.models import Provider, ProviderState, Token


class TokenInline(admin.TabularInline):
    model = Token
    fields = readonly_fields = ("version", "fingerprint", "token_type", "issued_at", "expires_at")
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ["-version"]
    verbose_name_plural = "token history (fingerprints only)"

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class ProviderStateInline(admin.StackedInline):
    model = ProviderState
    fields = readonly_fields = (
        "current_version",
        "last_refresh_at",
        "expires_at",
        "consecutive_failures",
        "last_error",
        "last_error_at",
        "permanent_error",
        "next_attempt_at",
        "last_attempt_at",
    )
    can_delete = False
    verbose_name_plural = "status"

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    list_display = [
        "name",
        "kind",
        "enabled",
        "fingerprint",
        "expires_in",
        "last_refresh",
        "failures",
        "last_error",
    ]
    list_filter = ["kind", "enabled"]
    search_fields = ["name"]
    list_select_related = ["refresh_state"]
    actions = ["refresh_now", "enable", "disable"]
    inlines = [ProviderStateInline, TokenInline]
    fieldsets = [
        ("Identity", {"fields": ["name", "kind", "enabled"]}),
        ("Generator", {"fields": ["config", "secret"]}),
        ("Schedule", {"fields": ["refresh_interval"]}),
    ]

    def _state(self, obj: Provider) -> ProviderState | None:
        try:
            return obj.refresh_state
        except ProviderState.DoesNotExist:
            return None

    @admin.display(description="fingerprint")
    def fingerprint(self, obj: Provider) -> str:
        state = self._state(obj)
        if state is None or not state.current_version:
            return "—"
        token = obj.tokens.filter(version=state.current_version).only("fingerprint").first()
        return token.fingerprint if token else "—"

    @admin.display(description="expires in")
    def expires_in(self, obj: Provider) -> str:
        state = self._state(obj)
        if state is None or state.last_refresh_at is None:
            return "—"
        if state.expires_at is None:
            return "never"
        left = state.expires_at - timezone.now()
        if left <= timedelta(0):
            return "expired"
        return str(timedelta(seconds=int(left.total_seconds())))

    @admin.display(description="last refresh")
    def last_refresh(self, obj: Provider) -> object:
        state = self._state(obj)
        return state.last_refresh_at if state else None

    @admin.display(description="failures")
    def failures(self, obj: Provider) -> int:
        state = self._state(obj)
        return state.consecutive_failures if state else 0

    @admin.display(description="last error")
    def last_error(self, obj: Provider) -> str:
        state = self._state(obj)
        error = state.last_error if state else ""
        return error[:80] + ("…" if len(error) > 80 else "")

    @admin.action(description="Refresh now")
    def refresh_now(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        for provider in queryset:
            if not provider.enabled:
                self.message_user(
                    request, f"{provider.name}: disabled, not refreshed.", messages.WARNING
                )
                continue
            services.refresh_enqueue(provider_id=provider.pk)
            self.message_user(request, f"{provider.name}: refresh queued.", messages.SUCCESS)

    @admin.action(description="Enable")
    def enable(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable")
    def disable(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        self._set_enabled(request, queryset, False)

    def _set_enabled(self, request: HttpRequest, queryset: QuerySet[Provider], value: bool) -> None:
        changed = 0
        for provider in queryset:
            if provider.enabled != value:
                provider.enabled = value
                provider.save(update_fields=["enabled", "updated_at"])  # signals follow
                changed += 1
        verb = "enabled" if value else "disabled"
        self.message_user(request, f"{changed} provider(s) {verb}.", messages.SUCCESS)
