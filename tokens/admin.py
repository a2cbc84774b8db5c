from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from tokens import connect, selectors
from tokens.conf import tokens_settings
from tokens.forms import ProviderForm
from tokens.models import Provider, ProviderState, Token
from tokens.services import refresh
from tokens.status import Status, refreshing_all, refreshing_ids, status_of, with_status


def _may_view_providers(request: HttpRequest) -> bool:
    """The status and the history (fingerprints) are part of what view_provider shows."""
    user = request.user
    return bool(user.is_active) and (
        user.has_perm("tokens.view_provider") or user.has_perm("tokens.change_provider")
    )


class _StatusInline:
    """Read-only parts of a provider's page, shown to whoever may view providers."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return _may_view_providers(request)


class TokenInline(_StatusInline, admin.TabularInline):
    model = Token
    fields = readonly_fields = ("version", "fingerprint", "token_type", "issued_at", "expires_at")
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ["-version"]
    verbose_name = "token"
    verbose_name_plural = "token history (fingerprints only, never values)"


class ProviderStateInline(_StatusInline, admin.StackedInline):
    model = ProviderState
    fields = readonly_fields = (
        "current_version",
        "last_refresh_at",
        "expires_at",
        "consecutive_failures",
        "last_error",
        "last_error_at",
        "error_kind",
        "next_attempt_at",
        "last_attempt_at",
    )
    can_delete = False
    verbose_name = verbose_name_plural = "refresh state"

    @admin.display(description="last error was")
    def error_kind(self, obj: ProviderState) -> str:
        if not obj.consecutive_failures:
            return "—"
        if obj.reconnect_needed:
            return "the grant is gone: connect the account again"
        if obj.permanent_error:
            return "permanent: only the schedule or a change tries again"
        return "transient: retried after the backoff"


class PageByIds(Paginator):
    """The list's pages read in two steps: the page's ids in the list's order (a walk of the
    name index), then only their rows. Slicing the rows themselves makes the database build
    every row before a deep page's (OFFSET 99,900 at 100,000 providers, the last page). A page
    in the second half is walked from the end (the order reversed), so no page walks more
    than half the list: the last page costs what the first does."""

    def page(self, number: Any) -> Page:
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        top = bottom + self.per_page
        if top + self.orphans >= self.count:
            top = self.count
        rows = cast(QuerySet[Provider], self.object_list)
        if rows.ordered and self.count - top < bottom:
            backwards = rows.reverse().values_list("pk", flat=True)
            ids = list(backwards[self.count - top : self.count - bottom])
        else:
            ids = list(rows.values_list("pk", flat=True)[bottom:top])
        return Page(rows.filter(pk__in=ids), number, self)


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(status.value, status.label) for status in Status]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Provider]) -> QuerySet[Provider]:
        value = self.value()
        if not value or value not in Status.__members__.values():
            return queryset
        return with_status(queryset, Status(value), refreshing=refreshing_all(), now=timezone.now())


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    form = ProviderForm
    # What an operator scans, fitting a 1280 px screen; the rest is on the provider's page.
    list_display = ["name", "kind", "status_badge", "expires_in", "last_refresh", "last_error"]
    list_filter = ["kind", "enabled", StatusFilter]
    search_fields = ["name"]
    list_select_related = ["refresh_state"]
    paginator = PageByIds
    # A filtered list counts its matches (its pages need that), not every provider again
    # beside them ("N results (M total)"): a second whole-table count on each page at 100,000.
    show_full_result_count = False
    actions = ["refresh_now", "enable", "disable"]
    inlines = [ProviderStateInline, TokenInline]
    readonly_fields = [
        "status_badge",
        "fingerprint",
        "next_refresh",
        "schedule_link",
        "flower_link",
    ]
    fieldsets = [
        ("Identity", {"fields": ["name", "kind", "enabled"]}),
        ("Generator", {"fields": ["config", "secret", "refresh_token"]}),
        ("Schedule", {"fields": ["refresh_interval", "next_refresh", "schedule_link"]}),
        ("Status", {"fields": ["status_badge", "fingerprint", "flower_link"]}),
    ]
    change_form_template = "admin/tokens/provider/change_form.html"

    class Media:
        css = {"all": ["tokens/admin.css"]}
        js = ["tokens/admin.js"]

    # ------------------------------------------------------------------ columns

    @admin.display(description="status")
    def status_badge(self, obj: Provider) -> str:
        if obj.pk is None:
            return "—"
        refreshing = getattr(obj, "_tokens_refreshing", None)  # the list's: one read per page
        if refreshing is None:
            refreshing = obj.pk in refreshing_ids([obj.pk])
        status = status_of(obj, obj.state_or_none, refreshing=refreshing, now=timezone.now())
        # Colours: tokens/static/tokens/admin.css; kept current by tokens/static/tokens/admin.js.
        return format_html(
            '<span class="tokens-status tokens-status-{}" data-tokens-provider="{}" '
            'data-tokens-url="{}">{}</span>',
            status.value,
            obj.pk,
            _status_url(obj),
            status.label,
        )

    @admin.display(description="fingerprint")
    def fingerprint(self, obj: Provider) -> str:
        state = obj.state_or_none
        if state is None or state.last_refresh_at is None or not state.fingerprint:
            return "—"
        return state.fingerprint

    @admin.display(description="expires in")
    def expires_in(self, obj: Provider) -> str:
        return format_html(
            '<span data-tokens-provider="{}" data-tokens-field="expires_in" data-tokens-url="{}">'
            "{}</span>",
            obj.pk,
            _status_url(obj),
            _expires_in(obj),
        )

    @admin.display(description="last refresh")
    def last_refresh(self, obj: Provider) -> str:
        return format_html(
            '<span data-tokens-provider="{}" data-tokens-field="last_refresh" '
            'data-tokens-url="{}">{}</span>',
            obj.pk,
            _status_url(obj),
            _last_refresh(obj),
        )

    @admin.display(description="last error")
    def last_error(self, obj: Provider) -> str:
        return format_html(
            '<span data-tokens-provider="{}" data-tokens-field="last_error" data-tokens-url="{}">'
            "{}</span>",
            obj.pk,
            _status_url(obj),
            _last_error(obj),
        )

    @admin.display(description="next refresh")
    def next_refresh(self, obj: Provider) -> str:
        state = obj.state_or_none
        if not obj.enabled or state is None or state.next_run_at is None:
            return "—" if obj.kind != "static" else "never (a static token is not refreshed)"
        return timezone.localtime(state.next_run_at).strftime("%Y-%m-%d %H:%M:%S %Z")

    @admin.display(description="beat schedule")
    def schedule_link(self, obj: Provider) -> str:
        task = selectors.dispatcher_entry()
        if task is None:
            return format_html(
                '<strong class="errornote">Missing: run <code>{}</code>.</strong>',
                "manage.py sync_token_schedules",
            )
        url = reverse("admin:django_celery_beat_periodictask_change", args=[task.pk])
        note = (
            format_html(" <strong>{}</strong>", "(disabled: no scheduled refreshes)")
            if not task.enabled
            else ""
        )
        return format_html(
            '<a href="{}">{}</a>, every {} s, sends the providers that are due{}',
            url,
            task.name,
            task.interval.every if task.interval else "?",
            note,
        )

    @admin.display(description="refreshes in Flower")
    def flower_link(self, obj: Provider) -> str:
        base = tokens_settings.FLOWER_URL.rstrip("/")
        if not base or obj.pk is None:
            return "—"
        return format_html(
            '<a href="{}/tasks" target="_blank" rel="noopener">Flower</a> '
            "(task <code>tokens.refresh_token</code>, args <code>({},)</code>; scheduled runs: "
            "<code>tokens.refresh_batch</code> with {} among the ids)",
            base,
            obj.pk,
            obj.pk,
        )

    @admin.display(description="secret")
    def secret_status(self, obj: Provider) -> str:
        return "stored (write-only: never shown)" if obj.secret else "none"

    @admin.display(description="refresh token")
    def refresh_token_status(self, obj: Provider) -> str:
        return "stored (write-only: never shown)" if obj.refresh_token else "none"

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # What every row's cells need, read once for the page's rows (the instances the
        # columns render): which are refreshing (one Redis read, not one per badge), and the
        # URL the page polls.
        rows = list(changelist.result_list)
        held = refreshing_ids(provider.pk for provider in rows)
        url = reverse("admin:tokens_provider_status")
        for provider in rows:
            provider._tokens_refreshing = provider.pk in held
            provider._tokens_status_url = url
        return changelist

    # ------------------------------------------------------------------ permissions
    #
    # Django's meaning, action by action: view_provider sees pages and the list (never the
    # secret), change_provider edits and enables or disables, refresh_provider (or change)
    # queues a refresh.

    def has_refresh_permission(self, request: HttpRequest, obj: Provider | None = None) -> bool:
        user = request.user
        return bool(
            user.is_active and user.has_perm("tokens.refresh_provider")
        ) or self.has_change_permission(request, obj)

    def get_inlines(self, request: HttpRequest, obj: Provider | None) -> Any:
        return self.inlines if obj is not None else []  # nothing to show before it exists

    def get_fieldsets(self, request: HttpRequest, obj: Provider | None = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None:
            # Nothing to show of a provider that does not exist yet: no status, no next run.
            return [
                (title, {**options, "fields": [f for f in options["fields"] if f in EDITABLE]})
                for title, options in fieldsets
                if any(f in EDITABLE for f in options["fields"])
            ]
        if obj is not None and not connect.connectable(obj):
            # Only connected accounts keep a refresh token.
            fieldsets = [
                (
                    title,
                    {**options, "fields": [f for f in options["fields"] if f != "refresh_token"]},
                )
                for title, options in fieldsets
            ]
        if obj is not None and not self.has_change_permission(request, obj):
            # A read-only page would render every field's value, the secret's included.
            return [
                (title, {**options, "fields": [_public(f) for f in options["fields"]]})
                for title, options in fieldsets
            ]
        return fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: Provider | None = None) -> Any:
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and not self.has_change_permission(request, obj):
            fields += ["secret_status", "refresh_token_status"]
        return fields

    def get_form(
        self, request: HttpRequest, obj: Provider | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        form = cast(type[ProviderForm], super().get_form(request, obj, change, **kwargs))
        form.redirect_uri = connect.redirect_uri(request)  # a class made for this request
        return form

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        provider = Provider.objects.filter(pk=object_id).first() if object_id.isdigit() else None
        extra_context = {
            **(extra_context or {}),
            "can_refresh": self.has_refresh_permission(request),
            "can_connect": provider is not None
            and connect.connectable(provider)
            and self.has_change_permission(request, provider),
            "connected": bool(provider and provider.refresh_token),
            "connect_hosts": connect.hosts(provider) if provider is not None else None,
        }
        return super().change_view(request, object_id, form_url, extra_context)

    # ------------------------------------------------------------------ actions

    @admin.action(description="Refresh now", permissions=["refresh"])
    def refresh_now(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        for provider in queryset:
            self._refresh(request, provider)

    def _refresh(self, request: HttpRequest, provider: Provider) -> None:
        if not provider.enabled:
            self.message_user(
                request, f"Provider {provider.name}: disabled, not refreshed.", messages.WARNING
            )
            return
        if not refresh.refresh_for_operator(provider_id=provider.pk, name=provider.name):
            self.message_user(
                request,
                f"Provider {provider.name}: a refresh was queued moments ago; not queued again.",
                messages.WARNING,
            )
            return
        self.message_user(request, f"Provider {provider.name}: refresh queued.", messages.SUCCESS)

    @admin.action(description="Enable", permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet[Provider]) -> None:
        self._set_enabled(request, queryset, True)

    @admin.action(description="Disable", permissions=["change"])
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

    # ------------------------------------------------------------------ detail page button

    def get_urls(self) -> list[Any]:
        custom = [
            path(
                "<int:object_id>/refresh/",
                self.admin_site.admin_view(self.refresh_view),
                name="tokens_provider_refresh",
            ),
            path(
                "<int:object_id>/connect/",
                self.admin_site.admin_view(self.connect_view),
                name="tokens_provider_connect",
            ),
            path(
                "status/",
                self.admin_site.admin_view(self.status_view),
                name="tokens_provider_status",
            ),
        ]
        return custom + super().get_urls()

    def refresh_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        provider = get_object_or_404(Provider, pk=object_id)
        if not self.has_refresh_permission(request, provider):
            raise PermissionDenied
        if request.method == "POST":
            self._refresh(request, provider)
        return HttpResponseRedirect(reverse("admin:tokens_provider_change", args=[object_id]))

    def status_view(self, request: HttpRequest) -> HttpResponse:
        """The statuses of the providers ``?ids=`` names (at most 500), for the pages'
        polling: what the badge, "expires in" and "last error" cells show."""
        if not self.has_view_or_change_permission(request):
            raise PermissionDenied
        raw = request.GET.get("ids", "")
        ids = [
            int(part)
            for part in raw.split(",")[:500]
            if part.isascii() and part.isdigit() and len(part) <= 18
        ]
        providers = list(Provider.objects.select_related("refresh_state").filter(pk__in=ids))
        refreshing = refreshing_ids(p.pk for p in providers)
        now = timezone.now()
        body = {
            str(p.pk): {
                "status": (
                    status := status_of(p, p.state_or_none, refreshing=p.pk in refreshing, now=now)
                ).value,
                "label": status.label,
                "expires_in": _expires_in(p),
                "last_refresh": _last_refresh(p),
                "last_error": _last_error(p),
            }
            for p in providers
        }
        return JsonResponse({"providers": body})

    def connect_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """Connect (or reconnect) the account: off to the identity provider, back at the
        callback. Connecting replaces the provider's credential: change permission."""
        provider = get_object_or_404(Provider, pk=object_id)
        if not self.has_change_permission(request, provider):
            raise PermissionDenied
        back = HttpResponseRedirect(reverse("admin:tokens_provider_change", args=[object_id]))
        if request.method != "POST":
            return back
        if not connect.connectable(provider):
            self.message_user(
                request, f"Provider {provider.name}: not a connected account.", messages.ERROR
            )
            return back
        try:
            provider.full_clean(exclude=["name"])
        except ValidationError as invalid:
            self.message_user(
                request,
                f"Provider {provider.name}: fix its config before connecting: "
                f"{'; '.join(invalid.messages)}",
                messages.ERROR,
            )
            return back
        return HttpResponseRedirect(connect.connect_begin(request, provider))


# What the add page shows: the fields an operator fills in.
EDITABLE = frozenset(
    {"name", "kind", "enabled", "config", "secret", "refresh_token", "refresh_interval"}
)


def _public(field: Any) -> Any:
    """The field shown in place of ``field`` on a read-only page."""
    return {"secret": "secret_status", "refresh_token": "refresh_token_status"}.get(field, field)


def _status_url(obj: Provider) -> str:
    """The URL of the status poll (the list's, read once per page)."""
    url = getattr(obj, "_tokens_status_url", None)
    return url if url is not None else reverse("admin:tokens_provider_status")


def _expires_in(obj: Provider) -> str:
    state = obj.state_or_none
    if state is None or state.last_refresh_at is None:
        return "—"
    if state.expires_at is None:
        return "never"
    left = state.expires_at - timezone.now()
    if left <= timedelta(0):
        return "expired"
    return str(timedelta(seconds=int(left.total_seconds())))


def _last_error(obj: Provider) -> str:
    state = obj.state_or_none
    error = state.last_error if state and state.consecutive_failures else ""
    return error[:60] + ("…" if len(error) > 60 else "") if error else "—"


def _last_refresh(obj: Provider) -> str:
    state = obj.state_or_none
    if state is None or state.last_refresh_at is None:
        return "—"
    return timezone.localtime(state.last_refresh_at).strftime("%Y-%m-%d %H:%M:%S")
