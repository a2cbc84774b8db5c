"""The schedule: next runs, beat's one entry, the dispatcher and its batches."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

from tests.factories import counted_provider, state
from tests.processes import broker_messages
from tokens.constants import DISPATCH_ENTRY, Reason
from tokens.models import Provider, ProviderState
from tokens.services import refresh, schedule

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def next_run(provider: Provider):  # type: ignore[no-untyped-def]
    return state(provider).next_run_at


def set_next_run(provider: Provider, when) -> None:  # type: ignore[no-untyped-def]
    ProviderState.objects.filter(provider=provider).update(next_run_at=when)


def beat_changes():  # type: ignore[no-untyped-def]
    """What makes beat reload its whole schedule (django-celery-beat's change marker)."""
    return PeriodicTasks.last_change()


def test_dispatcher__one_beat_entry_exists_after_migrate() -> None:
    task = PeriodicTask.objects.get(name=DISPATCH_ENTRY)
    assert task.task == "tokens.dispatch_due" and task.enabled
    assert (task.interval.every, task.interval.period) == (1, IntervalSchedule.SECONDS)
    assert task.expire_seconds == 5  # a dispatch stuck behind a backlog is dropped


def test_schedule__new_provider_runs_one_interval_after_creation() -> None:
    before = timezone.now()
    provider = counted_provider(interval=30)
    after = timezone.now()
    assert before + timedelta(seconds=30) <= next_run(provider) <= after + timedelta(seconds=30)


def test_schedule__interval_edit_counts_from_the_previous_run_and_never_lies_in_the_past() -> None:
    provider = counted_provider(interval=60)
    now = timezone.now()
    set_next_run(provider, now + timedelta(seconds=50))  # the previous run was 10 s ago
    provider.refresh_interval = timedelta(seconds=30)
    provider.save()
    assert next_run(provider) == now + timedelta(seconds=20)
    provider.refresh_interval = timedelta(seconds=120)
    provider.save()
    assert next_run(provider) == now + timedelta(seconds=110)
    provider.refresh_interval = timedelta(seconds=5)  # the previous run is older than that
    provider.save()
    assert now <= next_run(provider) <= timezone.now()


def test_schedule__provider_edits_never_make_beat_reload() -> None:
    """A PeriodicTask per provider made every edit reload beat's whole schedule (#675)."""
    changes = beat_changes()
    provider = counted_provider(interval=60)
    for seconds in (30, 90):
        provider.refresh_interval = timedelta(seconds=seconds)
        provider.save()
    provider.enabled = False
    provider.save()
    provider.delete()
    assert beat_changes() == changes
    assert not PeriodicTask.objects.filter(name__startswith="tokens.refresh:").exists()


def test_refresh__never_saves_a_periodic_task() -> None:
    """Saving a PeriodicTask on every run would make beat reload its schedule every run."""
    provider = counted_provider()
    changes = beat_changes()
    for reason in (Reason.MANUAL, Reason.SCHEDULE, Reason.READER):
        refresh.token_refresh(provider_id=provider.pk, reason=reason)
    set_next_run(provider, timezone.now())
    schedule.due_dispatch()
    assert beat_changes() == changes


def test_dispatch__claims_due_providers_once_and_moves_each_one_interval_on() -> None:
    due = [counted_provider(f"due-{i}", interval=60) for i in range(3)]
    later = counted_provider("later", interval=60)
    now = timezone.now()
    for offset, provider in enumerate(due):
        set_next_run(provider, now - timedelta(seconds=3 - offset))
    batches = schedule.due_dispatch(now=now)
    assert batches == [[p.pk for p in due]]  # oldest first
    for offset, provider in enumerate(due):
        # on the provider's own grid: one interval after its due time, not after "now"
        assert next_run(provider) == now - timedelta(seconds=3 - offset) + timedelta(seconds=60)
    assert next_run(later) > now
    assert schedule.due_dispatch(now=now) == []  # claimed once


def test_dispatch__a_run_missed_by_more_than_an_interval_is_dropped_not_caught_up() -> None:
    provider = counted_provider(interval=60)
    now = timezone.now()
    set_next_run(provider, now - timedelta(minutes=10))  # say beat was down
    assert schedule.due_dispatch(now=now) == [[provider.pk]]
    assert next_run(provider) == now + timedelta(seconds=60)


def test_dispatch__skips_disabled_providers_and_a_re_enabled_one_starts_over() -> None:
    provider = counted_provider(interval=60)
    provider.enabled = False
    provider.save()
    set_next_run(provider, timezone.now() - timedelta(seconds=5))
    assert schedule.due_dispatch() == []
    before = timezone.now()
    provider.enabled = True
    provider.save()
    assert next_run(provider) >= before + timedelta(seconds=60)


def sent_batches() -> list[tuple[list[int], float]]:
    """The batches the dispatcher sent (in the broker: no worker runs here), each with how
    long from now its message expires."""
    from datetime import datetime

    now = timezone.now()
    return [
        (
            message["args"][0],
            (datetime.fromisoformat(message["headers"]["expires"]) - now).total_seconds(),
        )
        for message in broker_messages("tokens.scheduled")
    ]


def test_dispatch__sends_batches_of_the_setting_grouped_by_interval(settings) -> None:
    settings.TOKENS_DISPATCH_BATCH = 2
    now = timezone.now()
    fast = [counted_provider(f"fast-{i}", interval=10) for i in range(3)]
    slow = [counted_provider(f"slow-{i}", interval=60) for i in range(2)]
    for provider in fast + slow:
        set_next_run(provider, now)
    batches = schedule.due_dispatch(now=now)
    assert sorted(map(sorted, batches)) == sorted(
        [sorted(p.pk for p in fast[:2]), [fast[2].pk], sorted(p.pk for p in slow)]
    )
    # each batch expires after its providers' interval: by then their next run is claimed
    fast_ids = {p.pk for p in fast}
    sent = sent_batches()
    for ids, expires_in in sent:
        assert abs(expires_in - (10 if set(ids) <= fast_ids else 60)) < 5
    assert sorted(map(sorted, (ids for ids, _ in sent))) == sorted(map(sorted, batches))


@pytest.mark.django_db(transaction=True)
def test_dispatch__two_dispatchers_never_claim_one_provider() -> None:
    """Two beats (or a slow dispatch and the next) run at once: each provider is sent once."""
    import threading

    from django.db import connection

    providers = Provider.objects.bulk_create(
        [Provider(name=f"p-{i}", kind="static", secret="x") for i in range(300)]
    )
    schedule.next_runs_sync_all()
    ProviderState.objects.update(next_run_at=timezone.now() - timedelta(seconds=1))
    barrier = threading.Barrier(3)
    claimed: list[list[list[int]]] = []

    def dispatch() -> None:
        barrier.wait()
        try:
            for _ in range(3):
                claimed.append(schedule.due_dispatch())
        finally:
            connection.close()

    threads = [threading.Thread(target=dispatch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ids = [pid for batches in claimed for batch in batches for pid in batch]
    assert sorted(ids) == sorted(p.pk for p in providers)  # all of them, none twice
    assert sorted(pid for batch, _ in sent_batches() for pid in batch) == sorted(ids)


def test_sync_token_schedules__schedules_bulk_created_providers_spread_over_the_interval() -> None:
    PeriodicTask.objects.filter(name=DISPATCH_ENTRY).delete()
    legacy = schedule.interval_schedule_get(every=timedelta(seconds=10))
    PeriodicTask.objects.create(
        name="tokens.refresh:old", task="tokens.refresh_token", interval=legacy
    )
    providers = Provider.objects.bulk_create(  # no signals, no state, no schedule
        [
            Provider(
                name=f"bulk-{i}",
                kind="callable",
                config={"path": "tests.callables.counted"},
                refresh_interval=timedelta(60),
            )
            for i in range(100)
        ]
    )
    before = timezone.now()
    out = StringIO()
    call_command("sync_token_schedules", stdout=out)
    assert "100 created" in out.getvalue()
    assert PeriodicTask.objects.filter(name=DISPATCH_ENTRY).exists()
    assert not PeriodicTask.objects.filter(name__startswith="tokens.refresh:").exists()
    offsets = sorted(
        (next_run(p) - before).total_seconds() / timedelta(60).total_seconds() for p in providers
    )
    assert offsets[0] >= 0 and offsets[-1] < 1.01
    # spread: every tenth of the interval holds some of them
    assert {int(offset * 10) for offset in offsets} >= set(range(10))
    out = StringIO()
    call_command("sync_token_schedules", stdout=out)
    assert "0 created, 0 updated, 100 unchanged" in out.getvalue()


def test_schedule__a_token_shorter_than_the_interval_is_refreshed_before_it_lapses() -> None:
    """Interval 5 minutes, token 3 s: the next scheduled refresh is before the token stops
    being handed out (its expiry minus the skew), not five minutes on."""
    from tests.factories import make_provider
    from tokens.models import Token

    provider = make_provider(
        "short", kind="callable", config={"path": "tests.callables.short_lived"}, interval=300
    )
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    token = Token.objects.get(provider=provider)
    due = next_run(provider)
    assert token.usable_until is not None and due < token.usable_until
    assert due > token.issued_at  # not at once: a refresh per dispatch would be a storm
    # And the refresh it sends then is not skipped as "fresh".
    assert not state(provider).token_is_fresh(provider.refresh_interval, due)


def test_schedule__a_static_provider_is_never_scheduled() -> None:
    from tests.factories import make_provider

    provider = make_provider("fixed", kind="static", secret="a-static-token", interval=5)
    assert next_run(provider) is None
    assert schedule.due_dispatch(now=timezone.now() + timedelta(days=1)) == []
    call_command("sync_token_schedules", stdout=StringIO())
    assert next_run(provider) is None


def test_schedule__a_fresh_skip_still_schedules_before_the_token_lapses() -> None:
    """A token stored outside the schedule (Refresh now) makes the scheduled run a "fresh"
    skip: the next run must still come before that token stops being handed out."""
    from tests.factories import make_provider

    provider = make_provider(
        "short", kind="callable", config={"path": "tests.callables.short_lived"}, interval=300
    )
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    set_next_run(provider, timezone.now())
    schedule.due_dispatch()  # claims it: next run one interval on
    outcome = refresh.token_refresh(provider_id=provider.pk, reason=Reason.SCHEDULE).outcome
    assert outcome == "skipped-fresh"
    due = state(provider).next_refresh_for_expiry()
    assert due is not None and next_run(provider) <= due
