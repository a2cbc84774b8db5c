"""Keep beat's schedule, the cache and the other processes in step with Provider rows.

However a provider changes (admin, ORM, fixtures, shell), its schedule follows; a new,
re-enabled or re-configured provider is refreshed at once on commit and tokens minted for its old
config are void; a disabled or deleted one is dropped from every process's memory.
"""

from __future__ import annotations

from typing import Any

from django.db.models.signals import post_delete, post_migrate, post_save, pre_save
from django.dispatch import receiver

from tokens import services
from tokens.models import Provider

# What a token depends on: changing any of these voids the tokens issued so far. The name too:
# it is where the application sends the tokens, and a refresh in flight under the old name
# must not store (and cache) a token for it.
TOKEN_INPUTS = ("name", "kind", "config", "secret")


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
    instance._tokens_previous = None  # type: ignore[attr-defined]
    services.schedule_sync(provider=instance, previous=previous, created=created)
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
    services.provider_forget(name=instance.name)


@receiver(post_migrate, dispatch_uid="tokens.post_migrate")
def install_dispatcher(sender: Any, app_config: Any = None, **kwargs: Any) -> None:
    """After migrate: beat's dispatcher entry exists (an operator may disable, not lose it)."""
    if app_config is not None and app_config.label == "tokens":
        services.dispatcher_schedule_ensure()
