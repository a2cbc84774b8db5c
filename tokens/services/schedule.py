"""The schedule: each provider's next run is a column of its state (``next_run_at``), and beat
runs one entry, the dispatcher (DISPATCH_ENTRY), every TOKENS_DISPATCH_EVERY seconds. Its task
claims the providers whose run has come, moves each one interval on, and sends them to the
workers in batches.

A PeriodicTask per provider would make beat reload and compare every entry on each change and
each send; this keeps beat's work constant however many providers there are, and a provider's
schedule is its own row (its interval, editable in admin).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Case, DateTimeField, ExpressionWrapper, F, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from tokens import locks, metrics, queue
from tokens.conf import tokens_settings
from tokens.constants import DISPATCH_ENTRY, DISPATCH_TASK, LEGACY_ENTRY_PREFIX
from tokens.generators import registry
from tokens.models import Provider, ProviderState


def dispatcher_entry_ensure() -> bool:
    """Create beat's dispatcher entry if it is missing (never re-enables a disabled one), on
    the urgent queue; remove the per-provider entries ("tokens.refresh:<name>") of earlier
    versions. Returns True when something changed."""
    every = interval_schedule_get(every=tokens_settings.timedelta("DISPATCH_EVERY"))
    lane = tokens_settings.QUEUE_URGENT or None
    entry, created = PeriodicTask.objects.get_or_create(
        name=DISPATCH_ENTRY,
        defaults={
            "task": DISPATCH_TASK,
            "interval": every,
            "args": "[]",
            "kwargs": "{}",
            # A dispatch that waited this long is stale: the next one claims the same providers.
            "expire_seconds": max(5, every.every * 5),
            "description": "Sends the token refreshes that are due (managed by tokens).",
            # The urgent queue: scheduled batches (slow endpoints) never hold up the dispatcher.
            "queue": lane,
        },
    )
    moved = False
    if not created and entry.queue != lane:
        entry.queue = lane
        entry.save(update_fields=["queue"])  # save(): tells beat through PeriodicTasks.changed()
        moved = True
    legacy = 0
    for task in PeriodicTask.objects.filter(name__startswith=LEGACY_ENTRY_PREFIX):
        task.delete()  # delete(), not a bulk delete: tells beat through PeriodicTasks.changed()
        legacy += 1
    return created or moved or bool(legacy)


def interval_schedule_get(*, every: timedelta) -> IntervalSchedule:
    """The shared IntervalSchedule row for ``every`` (one row per distinct interval)."""
    seconds = max(1, int(every.total_seconds()))
    try:
        schedule, _ = IntervalSchedule.objects.get_or_create(
            every=seconds, period=IntervalSchedule.SECONDS
        )
    except IntervalSchedule.MultipleObjectsReturned:  # concurrent get_or_create made two
        schedule = (
            IntervalSchedule.objects.filter(every=seconds, period=IntervalSchedule.SECONDS)
            .order_by("pk")
            .first()
        )
        assert schedule is not None
    return schedule


def _phase(provider_id: int) -> float:
    """A fixed share of the interval, well spread over ids (golden ratio), in [0, 1)."""
    return (provider_id * 0.6180339887498949) % 1.0


def next_run_sync(
    *, provider: Provider, previous: Provider | None = None, created: bool = False
) -> None:
    """Keep the provider's next scheduled refresh in step with it.

    New (or re-enabled): one interval from now (its first token is fetched at once, on
    commit). Interval changed: as if the new interval had always applied, counted from the
    previous run, and never in the past. No schedule yet (bulk_create, an upgrade): a fixed
    phase of the interval, so that many such providers do not all fall due together.
    """
    now = timezone.now()
    interval = provider.refresh_interval
    ProviderState.objects.ensure([provider.pk])
    states = ProviderState.objects.filter(provider_id=provider.pk)
    if not _scheduled(provider.kind):
        states.update(next_run_at=None)  # a static token: nothing to refresh, ever
        return
    next_run_at = states.values_list("next_run_at", flat=True).first()
    if next_run_at is None:
        states.update(next_run_at=now + (interval if created else interval * _phase(provider.pk)))
        return
    re_enabled = previous is not None and provider.enabled and not previous.enabled
    if re_enabled:
        states.update(next_run_at=now + interval)
        return
    if previous is not None and previous.refresh_interval != interval:
        # One statement: a dispatch that moves next_run_at on meanwhile is not overwritten.
        states.update(
            next_run_at=Greatest(
                ExpressionWrapper(
                    F("next_run_at") - previous.refresh_interval + interval,
                    output_field=DateTimeField(),
                ),
                Value(now, output_field=DateTimeField()),
            )
        )


def next_runs_sync_all() -> dict[str, list[str]]:
    """Give every provider without a schedule one (spread over its interval), and make sure
    beat's dispatcher entry exists. A few statements, however many providers."""
    report: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
    ProviderState.objects.ensure(
        list(Provider.objects.filter(refresh_state__isnull=True).values_list("pk", flat=True))
    )
    now = timezone.now()
    never = [kind for kind, generator in registry().items() if not generator.scheduled]
    ProviderState.objects.filter(provider__kind__in=never).update(next_run_at=None)
    unscheduled = list(
        ProviderState.objects.filter(next_run_at__isnull=True)
        .exclude(provider__kind__in=never)
        .select_related("provider")
    )
    for state in unscheduled:
        state.next_run_at = now + state.provider.refresh_interval * _phase(state.provider_id)
    ProviderState.objects.bulk_update(unscheduled, ["next_run_at"], batch_size=500)
    created = {state.provider.name for state in unscheduled}
    report["created"] = sorted(created)
    # In Python, not exclude(pk__in=…): SQLite refuses a statement with over 32,766 parameters.
    report["unchanged"] = sorted(set(Provider.objects.values_list("name", flat=True)) - created)
    if dispatcher_entry_ensure():
        report["updated"].append(DISPATCH_ENTRY)
    return report


def next_runs_soon(*, provider_ids: list[int]) -> None:
    """Make these providers due at the next dispatch (a refresh asked for now found another
    one running, perhaps with an old config: the schedule takes it over rather than drop it)."""
    ProviderState.objects.filter(provider_id__in=provider_ids).update(next_run_at=timezone.now())


def due_dispatch(*, now: datetime | None = None) -> list[list[int]]:
    """Claim the enabled providers whose scheduled refresh is due and send them in batches.

    Each claimed provider's ``next_run_at`` moves one interval on (a run missed by more than an
    interval is dropped, not caught up). Two claims never take one provider: rows are locked
    (PostgreSQL: SKIP LOCKED) or the transaction holds SQLite's write lock.

    While running batches take due providers as they fall due (``due_take``), it claims
    none: when they keep up it sends nothing, and when one asks for help it sends an empty
    batch, which takes what is due wherever a worker process is free (claimed providers would
    wait in the queue behind busy processes; an empty batch holds none). Returns the batches
    sent (ids), oldest due first.
    """
    now = now or timezone.now()
    taken = locks.schedule_taken()
    if taken == "help":
        # Stale once the batches it was meant to help have stopped taking on providers.
        queue.batch_send(
            provider_ids=[], due=None, expires=tokens_settings.seconds("BATCH_PULL_FOR")
        )
        return [[]]
    if taken:
        return []
    with transaction.atomic():
        due = _claim(now=now, limit=int(tokens_settings.DISPATCH_LIMIT))
        names = {provider_id: name for provider_id, _, _, name in due}
        groups: dict[timedelta, list[tuple[int, datetime]]] = {}
        for provider_id, due_at, interval, _ in due:
            groups.setdefault(interval, []).append((provider_id, due_at))
        batches: list[tuple[list[int], datetime, timedelta]] = []
        size = max(1, int(tokens_settings.DISPATCH_BATCH))
        for interval, members in groups.items():
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                batches.append(([pid for pid, _ in chunk], chunk[0][1], interval))
        # Sent before the claim commits: a dispatch that cannot reach the broker claims nothing
        # (and a claim that fails to commit after the send only repeats refreshes, which skip).
        for ids, oldest_due, interval in batches:
            # A batch that waited a whole interval is dropped: the next run is already claimed.
            queue.batch_send(
                provider_ids=ids,
                names=[names[pid] for pid in ids],
                due=oldest_due.timestamp(),
                expires=interval.total_seconds(),
            )
    metrics.SCHEDULE_DISPATCHED.inc(len(due))
    return [ids for ids, _, _ in batches]


# A take leaves the schedule to the batches for this many TOKENS_BATCH_PULL_EVERY: a batch
# whose next take comes a little late (a busy process) is not taken for gone.
TAKEN_FOR = 4


def due_take(*, limit: int) -> list[int]:
    """For a batch with room for ``limit`` more: claim up to that many providers whose
    scheduled refresh is due, oldest first, as ``due_dispatch`` does, and return them for the
    batch to refresh itself. The dispatcher leaves the schedule to the batches that take it
    for TAKEN_FOR TOKENS_BATCH_PULL_EVERY (a dispatch at least): keeping up when this took
    every provider that was due, none of them late; asking for help (another process) when it
    had no room for them all (none: a batch at its bound, or done taking on more) or they had
    waited."""
    now = timezone.now()
    due = []
    if limit > 0:
        with transaction.atomic():
            due = _claim(now=now, limit=limit)
    every = tokens_settings.seconds("BATCH_PULL_EVERY")
    behind = bool(due) and (now - due[0][1]).total_seconds() > 2 * every
    locks.schedule_taken_mark(
        max(TAKEN_FOR * every, tokens_settings.seconds("DISPATCH_EVERY")),
        keeping_up=len(due) < limit and not behind,
    )
    if due:
        metrics.SCHEDULE_DISPATCHED.inc(len(due))
        metrics.SCHEDULE_LATENESS.observe(max(0.0, (now - due[0][1]).total_seconds()))
    return [provider_id for provider_id, _, _, _ in due]


def _claim(*, now: datetime, limit: int) -> list[tuple[int, datetime, timedelta, str]]:
    """In the caller's transaction: lock up to ``limit`` due rows (oldest first), move each
    one interval on; (id, due at, interval, name) of each."""
    due = list(
        ProviderState.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(next_run_at__lte=now, provider__enabled=True)
        .order_by("next_run_at", "provider_id")
        .values_list("provider_id", "next_run_at", "provider__refresh_interval", "provider__name")[
            :limit
        ]
    )
    by_interval: dict[timedelta, list[int]] = {}
    for provider_id, _, interval, _ in due:
        by_interval.setdefault(interval, []).append(provider_id)
    for interval, ids in by_interval.items():
        for start in range(0, len(ids), 500):
            ProviderState.objects.filter(provider_id__in=ids[start : start + 500]).update(
                next_run_at=Case(
                    When(
                        next_run_at__gt=now - interval,
                        then=ExpressionWrapper(
                            F("next_run_at") + interval, output_field=DateTimeField()
                        ),
                    ),
                    default=Value(now + interval, output_field=DateTimeField()),
                )
            )
    return due  # type: ignore[return-value]  # next_run_at is not null: filtered on it


def _scheduled(kind: str) -> bool:
    generator = registry().get(kind)
    return generator is None or generator.scheduled
