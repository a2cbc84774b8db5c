"""The reads of the database behind get_token()."""

from __future__ import annotations

from django.utils import timezone

from tokens.exceptions import ProviderDisabled, UnknownProvider
from tokens.models import Provider, ProviderState, Token


def provider_for_reading(*, name: str) -> Provider:
    """The enabled provider called ``name``; UnknownProvider or ProviderDisabled otherwise."""
    provider = Provider.objects.filter(name=name).first()
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
    if token is None or (token.expires_at is not None and token.expires_at <= timezone.now()):
        return None
    return token
