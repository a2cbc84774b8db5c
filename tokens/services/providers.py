"""What saving or deleting a provider means, however it is saved (admin, ORM, fixtures, shell).

Its schedule follows it; a new, re-enabled or re-configured provider is refreshed at once on
commit, and the tokens minted for its old config are void (even one in flight); a disabled,
renamed or deleted one is dropped from every process's memory.
"""

from __future__ import annotations

from tokens import queue
from tokens.constants import Reason
from tokens.models import Provider
from tokens.services.invalidation import provider_forget, provider_invalidate
from tokens.services.schedule import dispatcher_entry_ensure, next_run_sync

# What a token depends on: changing any of these voids the tokens issued so far. The name too:
# it is where the application sends the tokens, and a refresh in flight under the old name
# must not store (and cache) a token for it.
TOKEN_INPUTS = ("name", "kind", "config", "secret")


def provider_before_save(*, provider: Provider) -> Provider | None:
    """The provider as stored before this save (None for a new one), to compare with after."""
    if provider.pk is None:
        return None
    previous = Provider.objects.filter(pk=provider.pk).first()
    if previous is not None and not provider.refresh_token_changed():
        # Not set by the caller: the save keeps the stored one (RotatingSecretField), which
        # may have rotated since this instance was read; show the instance the current one.
        provider.refresh_token = previous.refresh_token
        provider._loaded_refresh_token = previous.refresh_token
    return previous


def provider_saved(*, provider: Provider, previous: Provider | None, created: bool) -> None:
    """Keep the schedule, the cache and the other processes in step with a saved provider."""
    next_run_sync(provider=provider, previous=previous, created=created)
    if previous is not None and previous.name != provider.name:
        provider_forget(name=previous.name)
    # A refresh token counts when the caller set a new one (a rotation is no save at all).
    new_refresh_token = bool(provider.refresh_token) and (
        previous is None or previous.refresh_token != provider.refresh_token
    )
    changed = (
        previous is None
        or new_refresh_token
        or any(getattr(previous, field) != getattr(provider, field) for field in TOKEN_INPUTS)
    )
    re_enabled = previous is not None and provider.enabled and not previous.enabled
    if provider.enabled and (changed or re_enabled):
        if previous is not None:
            provider_invalidate(
                provider=provider, reset_failures=True, new_refresh_token=new_refresh_token
            )
        queue.refresh_send(provider_id=provider.pk, reason=Reason.MANUAL, name=provider.name)
    elif not provider.enabled and (previous is None or previous.enabled or changed):
        provider_invalidate(
            provider=provider, reset_failures=changed, new_refresh_token=new_refresh_token
        )


def provider_deleted(*, provider: Provider) -> None:
    """Drop a deleted provider's cached token from Redis and every process's memory."""
    provider_forget(name=provider.name)


def app_migrated() -> None:
    """After migrate: beat's dispatcher entry exists (an operator may disable, not lose it)."""
    dispatcher_entry_ensure()
