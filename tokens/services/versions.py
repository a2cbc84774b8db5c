"""Versions and the stored tokens: every refresh or invalidation takes the provider's next
version (its fence) from the database, and a token is stored only if its version is newer than
the current one, so a late, older writer never wins.

A rotated refresh token has a fence of its own (``ProviderState.refresh_token_version``): it is
stored whenever it is newer than the stored one, even when its access token lost (an
invalidation moved the access token's fence on meanwhile), since the issuer may already have
retired the one before it."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import connections, router, transaction
from django.db.models import Case, F, OuterRef, Subquery, Value, When
from django.utils import timezone

from tokens.conf import tokens_settings
from tokens.generators import GeneratedToken, registry
from tokens.models import Provider, ProviderState, Token, refresh_lead

logger = logging.getLogger("tokens.refresh")


def fences_next(*, provider_ids: list[int]) -> dict[int, int]:
    """Hand out the next version of each provider in one statement; the row locks order
    concurrent callers. Providers without a state row (deleted) are left out."""
    if not provider_ids:
        return {}
    connection = connections[router.db_for_write(ProviderState)]
    quote = connection.ops.quote_name
    marks = ", ".join(["%s"] * len(provider_ids))
    # Identifiers are the model's own, quoted; values are parameters.
    sql = (
        f"UPDATE {quote(ProviderState._meta.db_table)} "  # noqa: S608
        f"SET {quote('fence')} = {quote('fence')} + 1 "
        f"WHERE {quote('provider_id')} IN ({marks}) "
        f"RETURNING {quote('provider_id')}, {quote('fence')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, list(provider_ids))
        return {int(pid): int(fence) for pid, fence in cursor.fetchall()}


def fence_next(*, provider_id: int) -> int:
    """The next version of one provider (ProviderState.DoesNotExist when it has no state)."""
    fence = fences_next(provider_ids=[provider_id]).get(provider_id)
    if fence is None:
        raise ProviderState.DoesNotExist(f"no refresh state for provider {provider_id}")
    return fence


def tokens_store_many(
    *, items: list[tuple[Provider, int, GeneratedToken, datetime]]
) -> list[Token | None]:
    """Persist each (provider, version, token, attempted) whose version is newer than its
    provider's current one, in one transaction; None where a newer one won."""
    if not items:
        return []
    now = timezone.now()
    results: list[Token | None] = []
    won: list[Token] = []
    with transaction.atomic():
        for provider, fence, generated, attempted in items:
            token = Token.from_generated(
                provider_id=provider.pk, version=fence, generated=generated, issued_at=now
            )
            if generated.refresh_token:
                _refresh_token_store(provider, fence, generated.refresh_token)
            changes: dict[str, object] = {}
            if generated.expires_at is not None:
                # The schedule refreshes it before it stops being handed out, whatever the
                # interval (an interval longer than a token's life must not let it lapse).
                due = generated.expires_at - refresh_lead(generated.expires_at - now)
                changes["next_run_at"] = Case(
                    When(next_run_at__gt=due, then=Value(due)), default=F("next_run_at")
                )
            updated = ProviderState.objects.filter(
                provider_id=provider.pk, current_version__lt=fence
            ).update(
                current_version=fence,
                last_refresh_at=now,
                last_attempt_at=attempted,
                expires_at=generated.expires_at,
                consecutive_failures=0,
                last_error="",
                next_attempt_at=None,
                permanent_error=False,
                reconnect_needed=False,
                fingerprint=token.fingerprint,
                **changes,
            )
            if not updated:
                results.append(None)
                continue
            state = provider.state_or_none
            if state is not None and token.fingerprint == state.fingerprint:
                # The issuer handed back the token we had: refreshing earlier gains nothing.
                logger.warning(
                    "refresh got the same token again provider=%s fingerprint=%s",
                    provider.name,
                    token.fingerprint,
                )
            won.append(token)
            results.append(token)
        if won:
            Token.objects.bulk_create(won)
            # A provider's versions are distinct, and the one just stored is its highest: while
            # that is within the history, there is nothing to prune (its first refreshes).
            history_prune(provider_ids=[t.provider_id for t in won if t.version > _history()])
    return results


def refresh_token_store(*, provider: Provider, fence: int, value: str) -> bool:
    """Store a rotated refresh token unless a newer one is stored (True when stored)."""
    with transaction.atomic():
        return _refresh_token_store(provider, fence, value)


def _refresh_token_store(provider: Provider, fence: int, value: str) -> bool:
    if not provider_uses_refresh_token(provider):
        return False  # an issuer handing one to a kind that has no use for it
    won = ProviderState.objects.filter(
        provider_id=provider.pk, refresh_token_version__lt=fence
    ).update(refresh_token_version=fence)
    if won:
        Provider.objects.filter(pk=provider.pk).update(refresh_token=value)
        provider.refresh_token = value
        provider._loaded_refresh_token = value
        logger.info("refresh token rotated provider=%s version=%s", provider.name, fence)
    else:
        logger.warning(
            "rotated refresh token discarded: a newer one is stored provider=%s version=%s",
            provider.name,
            fence,
        )
    return bool(won)


def provider_uses_refresh_token(provider: Provider) -> bool:
    generator = registry().get(provider.kind)
    return generator is not None and generator.uses_refresh_token


def _history() -> int:
    return max(1, int(tokens_settings.HISTORY))


def history_prune(*, provider_ids: list[int]) -> None:
    """Keep each provider's newest TOKENS_HISTORY tokens, in one statement."""
    if not provider_ids:
        return
    keep = _history()
    oldest_kept = (
        Token.objects.filter(provider_id=OuterRef("provider_id"))
        .order_by("-version")
        .values("version")[keep : keep + 1]
    )
    Token.objects.filter(provider_id__in=provider_ids, version__lte=Subquery(oldest_kept)).delete()
