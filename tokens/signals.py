"""Provider signals: each receiver connects, then calls one service (tokens.services.providers
decides what a save or a delete means)."""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_migrate, post_save, pre_save
from django.dispatch import receiver

from tokens.models import Provider
from tokens.services import providers


@receiver(pre_save, sender=Provider, dispatch_uid="tokens.provider.pre_save")
def remember_previous(sender: type[Provider], instance: Provider, raw: bool, **kwargs: Any) -> None:
    instance._tokens_previous = providers.provider_before_save(provider=instance)  # type: ignore[attr-defined]


@receiver(post_save, sender=Provider, dispatch_uid="tokens.provider.post_save")
def follow_provider(
    sender: type[Provider], instance: Provider, created: bool, raw: bool, **kwargs: Any
) -> None:
    previous: Provider | None = getattr(instance, "_tokens_previous", None)
    instance._tokens_previous = None  # type: ignore[attr-defined]
    providers.provider_saved(provider=instance, previous=previous, created=created)


@receiver(post_delete, sender=Provider, dispatch_uid="tokens.provider.post_delete")
def forget_provider(sender: type[Provider], instance: Provider, **kwargs: Any) -> None:
    providers.provider_deleted(provider=instance)


@receiver(post_migrate, dispatch_uid="tokens.post_migrate")
def install_dispatcher(sender: Any, app_config: Any = None, **kwargs: Any) -> None:
    if app_config is not None and app_config.label == "tokens":
        providers.app_migrated()
