"""Keep beat's schedule, the cache and the other processes in step with Provider rows.

However a provider changes (admin, ORM, fixtures, shell), its PeriodicTask follows; a new,
re-enabled or re-configured provider is refreshed at once on commit and tokens minted for its old
config are void; a disabled or deleted one is dropped from every process's memory.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_save, pre_save
from django.dispatch import receiver

from tokens import services
from tokens.models import Provider, ProviderState

# What a token depends on: changing any of these voids the tokens issued so far.
TOKEN_INPUTS = ("kind", "config", "secret")


@receiver(pre_save, sender=Provider, dispatch_uid="tokens.provider.pre_save")
def remember_previous(sender: type[Provider], instance: Provider, raw: bool, **kwargs: Any) -> None:
    previous = None
    if instance.pk is not None:
        previous = Provider.objects.filter(pk=instance.pk).first()
    instance._tokens_previous = previous  # type: ignore[attr-defined]


@receiver(post_save, sender=Provider, dispatch_uid="tokens.provider.post_save")
def follow_provider(
    sender: type[Provider], instance: Provider, created: bool, raw: bool, **kwargs: Any
) -> None:
    previous: Provider | None = getattr(instance, "_tokens_previous", None)
    if created:
        ProviderState.objects.get_or_create(provider=instance)
    instance._tokens_previous = None  # type: ignore[attr-defined]
    previous_name = previous.name if previous is not None else None
    services.schedule_sync(provider=instance, previous_name=previous_name)
    if previous is not None and previous.name != instance.name:
        services.provider_forget(name=previous.name)
    if previous is None:
        changed_inputs = True
    else:
        changed_inputs = any(getattr(previous, f) != getattr(instance, f) for f in TOKEN_INPUTS)
    re_enabled = previous is not None and instance.enabled and not previous.enabled
    if instance.enabled and (changed_inputs or re_enabled):
        if previous is not None:
            services.provider_invalidate(provider=instance, reset_failures=True)
        services.refresh_enqueue(provider_id=instance.pk)
    elif not instance.enabled and (previous is None or previous.enabled or changed_inputs):
        services.provider_invalidate(provider=instance, reset_failures=changed_inputs)


@receiver(post_delete, sender=Provider, dispatch_uid="tokens.provider.post_delete")
def forget_provider(sender: type[Provider], instance: Provider, **kwargs: Any) -> None:
    services.schedule_remove(provider_name=instance.name)
    services.provider_forget(name=instance.name)
