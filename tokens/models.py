from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from tokens import crypto
from tokens.conf import tokens_settings
from tokens.fields import EncryptedTextField, RotatingSecretField
from tokens.generators import GeneratedToken, get_generator, kind_choices, registry


def expiry_skew(lifetime: timedelta) -> timedelta:
    """How long before its expiry a token of ``lifetime`` stops being handed out:
    TOKENS_EXPIRY_SKEW, by default the smaller of 5 s and 10 % of the lifetime (never more
    than half of it)."""
    configured = tokens_settings.EXPIRY_SKEW
    skew = (
        min(timedelta(seconds=5), lifetime * 0.1)
        if configured is None
        else tokens_settings.timedelta("EXPIRY_SKEW")
    )
    return max(timedelta(0), min(skew, lifetime / 2))


def refresh_lead(lifetime: timedelta) -> timedelta:
    """How long before its expiry the schedule refreshes a token of ``lifetime``: its refresh
    margin (with the most jitter readers use), its expiry skew and one dispatch period, so the
    new token is stored before the old one stops being handed out; at most 60 % of the
    lifetime."""
    margin = lifetime * tokens_settings.REFRESH_MARGIN * 1.5
    lead = margin + expiry_skew(lifetime) + tokens_settings.timedelta("DISPATCH_EVERY")
    return min(lead, lifetime * 0.6)


# The database refuses intervals below this floor; TOKENS_MIN_REFRESH_INTERVAL (a setting, so
# not expressible in a migration) is enforced above it by validation.
INTERVAL_FLOOR = timedelta(seconds=1)


def secret_destination(kind: str, config: object) -> object:
    """Where a provider of ``kind`` with ``config`` sends its secret (compared, never shown)."""
    generator = registry().get(kind)
    if generator is None or not isinstance(config, dict):
        return (kind, None)
    return generator.secret_destination(config)


class ProviderQuerySet(models.QuerySet["Provider"]):
    def enabled(self) -> ProviderQuerySet:
        return self.filter(enabled=True)


class Provider(models.Model):
    """A source of access tokens: a generator kind, its config, a secret and a refresh interval."""

    name = models.SlugField(
        "name",
        max_length=100,
        unique=True,
        help_text="What code passes to get_token(). Letters, digits, hyphens and underscores.",
    )
    kind = models.CharField(
        "kind",
        max_length=64,
        choices=kind_choices,
        help_text="How tokens are made (the generator).",
    )
    config = models.JSONField(
        "config",
        default=dict,
        blank=True,
        help_text="Settings of the generator, as a JSON object; the keys depend on the kind.",
    )
    secret = EncryptedTextField(
        "secret",
        blank=True,
        help_text="Client secret (or the token of a static provider). Stored encrypted.",
    )
    refresh_token = RotatingSecretField(
        "refresh token",
        blank=True,
        help_text=(
            "A connected account's refresh token (oauth2_refresh_token), stored by Connect or "
            "pasted; the issuer rotates it and tokens stores each new one. Stored encrypted."
        ),
    )
    refresh_interval = models.DurationField(
        "refresh interval",
        default=timedelta(minutes=5),
        validators=[MinValueValidator(INTERVAL_FLOOR)],
        help_text="How often Celery beat refreshes the token, e.g. 00:05:00.",
    )
    enabled = models.BooleanField(
        "enabled",
        default=True,
        help_text="Disabled providers are not refreshed and get_token() raises ProviderDisabled.",
    )
    created_at = models.DateTimeField("created", auto_now_add=True, help_text="When it was added.")
    updated_at = models.DateTimeField("updated", auto_now=True, help_text="When it last changed.")

    objects = ProviderQuerySet.as_manager()
    # The refresh token as read from the database (see RotatingSecretField).
    _loaded_refresh_token: str

    class Meta:
        ordering = ["name"]
        verbose_name = "token provider"
        permissions = [("refresh_provider", "Can refresh a provider's token now")]
        constraints = [
            models.CheckConstraint(
                condition=Q(refresh_interval__gte=INTERVAL_FLOOR),
                name="tokens_provider_refresh_interval_floor",
                violation_error_message="The refresh interval must be at least one second.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any) -> Provider:
        instance = super().from_db(db, field_names, values)
        # What was read, for RotatingSecretField: a save writes it back only if changed.
        if "refresh_token" in instance.__dict__:
            instance._loaded_refresh_token = instance.refresh_token
        return instance

    def refresh_from_db(self, *args: Any, **kwargs: Any) -> None:
        # Also how Django loads a deferred field: what was read is the new baseline.
        super().refresh_from_db(*args, **kwargs)
        fields = kwargs.get("fields", args[1] if len(args) > 1 else None)
        if fields is None or "refresh_token" in fields:
            self._loaded_refresh_token = self.refresh_token

    def refresh_token_changed(self) -> bool:
        """Whether this instance's refresh token was set since it was read (or it is new)."""
        return getattr(self, "_loaded_refresh_token", None) != self.refresh_token

    @property
    def state_or_none(self) -> ProviderState | None:
        """Its refresh state, or None when it has none yet (made by ``bulk_create``)."""
        try:
            return self.refresh_state
        except ProviderState.DoesNotExist:
            return None

    def last_token_lifetime(self) -> timedelta | None:
        """How long its current token lives (None: none, or it does not expire)."""
        state = self.state_or_none
        if state is None or state.expires_at is None or state.last_refresh_at is None:
            return None
        return state.expires_at - state.last_refresh_at

    def secret_destination(self) -> object:
        """Where this provider sends its secret: its kind and, per kind, the endpoint."""
        return secret_destination(self.kind, self.config)

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        minimum = tokens_settings.timedelta("MIN_REFRESH_INTERVAL")
        maximum = tokens_settings.timedelta("MAX_REFRESH_INTERVAL")
        if self.refresh_interval is not None and self.refresh_interval < minimum:
            errors.setdefault("refresh_interval", []).append(
                f"Must be at least {minimum.total_seconds():g} seconds "
                "(TOKENS_MIN_REFRESH_INTERVAL)."
            )
        if self.refresh_interval is not None and self.refresh_interval > maximum:
            errors.setdefault("refresh_interval", []).append(
                f"Must be at most {maximum.days} days (TOKENS_MAX_REFRESH_INTERVAL)."
            )
        if self.kind not in registry():
            errors.setdefault("kind", []).append(f"Unknown kind {self.kind!r}.")
        elif self.refresh_token and not get_generator(self.kind).uses_refresh_token:
            errors.setdefault("refresh_token", []).append(
                f"Only oauth2_refresh_token providers keep a refresh token, not {self.kind}."
            )
        else:
            for field, messages in (
                get_generator(self.kind).validate(self.config, self.secret).items()
            ):
                errors.setdefault(field, []).extend(messages)
        if errors:
            raise ValidationError(errors)


class ProviderStateQuerySet(models.QuerySet["ProviderState"]):
    def ensure(self, provider_ids: list[int]) -> None:
        """Give each provider without one its state row (the only place rows are made)."""
        if provider_ids:
            self.bulk_create(
                [ProviderState(provider_id=pk) for pk in provider_ids],
                batch_size=500,
                ignore_conflicts=True,
            )


class ProviderState(models.Model):
    """What the refresh service knows about a provider: versions, status, backoff.

    Kept apart from Provider so that saving a provider (admin, ORM) can never write back stale
    status or move the version fence backwards; only the services write it, with UPDATEs.
    """

    provider = models.OneToOneField(
        Provider,
        on_delete=models.CASCADE,
        primary_key=True,
        related_name="refresh_state",
        verbose_name="provider",
        help_text="The provider this state belongs to.",
    )
    fence = models.PositiveBigIntegerField(
        "fence", default=0, help_text="Highest version handed to a refresh or an invalidation."
    )
    current_version = models.PositiveBigIntegerField(
        "current version",
        default=0,
        help_text="Version of the token that is valid now; tokens below it are void.",
    )
    last_refresh_at = models.DateTimeField(
        "last refresh", null=True, blank=True, help_text="When the current token was stored."
    )
    expires_at = models.DateTimeField(
        "expires at",
        null=True,
        blank=True,
        help_text="Expiry of the current token (empty: it does not expire, or there is none).",
    )
    consecutive_failures = models.PositiveIntegerField(
        "consecutive failures", default=0, help_text="Failed refreshes since the last success."
    )
    last_error = models.CharField(
        "last error", max_length=300, blank=True, help_text="The last refresh error, sanitized."
    )
    last_error_at = models.DateTimeField(
        "last error at", null=True, blank=True, help_text="When the last refresh failed."
    )
    next_attempt_at = models.DateTimeField(
        "next attempt",
        null=True,
        blank=True,
        help_text="After a transient failure, automatic refreshes wait until then (backoff).",
    )
    permanent_error = models.BooleanField(
        "permanent error",
        default=False,
        help_text="The last failure will not pass by retrying: only the schedule tries again.",
    )
    last_attempt_at = models.DateTimeField(
        "last attempt", null=True, blank=True, help_text="When the generator was last called."
    )
    fingerprint = models.CharField(
        "fingerprint",
        max_length=16,
        blank=True,
        help_text="Keyed hash of the current token (empty: none), to tell tokens apart.",
    )
    next_run_at = models.DateTimeField(
        "next scheduled refresh",
        null=True,
        blank=True,
        help_text="When the schedule refreshes next: one interval after the previous run.",
    )
    reconnect_needed = models.BooleanField(
        "reconnect needed",
        default=False,
        help_text=(
            "The connected account's grant is gone (invalid_grant, or never connected): only "
            "connecting it again helps; the schedule does not retry it."
        ),
    )
    refresh_token_version = models.PositiveBigIntegerField(
        "refresh token version",
        default=0,
        help_text="Version of the refresh that stored the refresh token; an older one never "
        "overwrites it.",
    )

    objects = ProviderStateQuerySet.as_manager()

    class Meta:
        verbose_name = "refresh state"
        indexes = [models.Index(fields=["next_run_at"], name="tokens_state_next_run_at")]

    def __str__(self) -> str:
        return "refresh state"

    def token_is_fresh(self, refresh_interval: timedelta, now: datetime | None = None) -> bool:
        """True when the current token is younger than half the interval and not near expiry.

        Half: beat's next run comes one interval after the last; a duplicate message (two beats,
        a redelivery) comes moments after it.
        """
        now = now or timezone.now()
        if not self.current_version or self.last_refresh_at is None:
            return False
        due = self.next_refresh_for_expiry()
        if due is not None and now >= due:
            return False
        return now - self.last_refresh_at < refresh_interval / 2

    def next_refresh_for_expiry(self) -> datetime | None:
        """When the schedule must refresh the current token at the latest (see refresh_lead);
        None when it does not expire."""
        if self.expires_at is None or self.last_refresh_at is None:
            return None
        return self.expires_at - refresh_lead(self.expires_at - self.last_refresh_at)


class Token(models.Model):
    """One token a provider issued. The last TOKENS_HISTORY are kept per provider."""

    provider = models.ForeignKey(
        Provider,
        on_delete=models.CASCADE,
        related_name="tokens",
        verbose_name="provider",
        help_text="The provider that issued it.",
    )
    version = models.PositiveBigIntegerField(
        "version", help_text="Per-provider, increasing: a newer token has a higher version."
    )
    value = EncryptedTextField("value", help_text="The token, stored encrypted; never displayed.")
    token_type = models.CharField(
        "token type", max_length=40, default="Bearer", help_text="Scheme for the header."
    )
    fingerprint = models.CharField(
        "fingerprint", max_length=16, help_text="Short keyed hash to tell tokens apart."
    )
    issued_at = models.DateTimeField("issued at", help_text="When it was stored.")
    expires_at = models.DateTimeField(
        "expires at", null=True, blank=True, help_text="Empty when the issuer gave no expiry."
    )
    refresh_at = models.DateTimeField(
        "refresh at",
        null=True,
        blank=True,
        help_text="From then on, readers ask for a new token (expiry minus a jittered margin).",
    )

    class Meta:
        ordering = ["provider", "-version"]
        get_latest_by = "version"
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "version"], name="tokens_token_version_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider_id} v{self.version} {self.fingerprint}"

    @property
    def usable_until(self) -> datetime | None:
        """When it stops being handed out: its expiry minus the skew (None: never)."""
        if self.expires_at is None:
            return None
        return self.expires_at - expiry_skew(self.expires_at - self.issued_at)

    @classmethod
    def from_generated(
        cls, *, provider_id: int, version: int, generated: GeneratedToken, issued_at: datetime
    ) -> Token:
        """The one conversion from a generator's token to a stored row: its fingerprint, and
        when readers should ask for the next one (before it stops being handed out, by a
        jittered share of the lifetime, so that many processes do not all ask at once)."""
        refresh_at = None
        if generated.expires_at is not None:
            lifetime = generated.expires_at - issued_at
            share = tokens_settings.REFRESH_MARGIN * random.uniform(1.0, 1.5)  # noqa: S311
            refresh_at = generated.expires_at - expiry_skew(lifetime) - lifetime * share
        return cls(
            provider_id=provider_id,
            version=version,
            value=generated.access_token,
            token_type=generated.token_type,
            fingerprint=crypto.fingerprint(generated.access_token),
            issued_at=issued_at,
            expires_at=generated.expires_at,
            refresh_at=refresh_at,
        )
