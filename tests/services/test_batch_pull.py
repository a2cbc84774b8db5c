"""A worker process keeps refreshing through an endpoint's latency: while a scheduled batch's
requests are in flight it takes on the providers that fall due meanwhile (as many as it has
room for), and the dispatcher leaves the schedule to it while it keeps up. Shown with endpoints
that hold each request until the test lets it answer (tests/gated.py): counts, never clocks."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from tests.factories import make_provider, oauth2_config, state
from tests.gated import GatedEndpoint
from tests.processes import broker_messages, wait_for
from tests.services.test_concurrent_refresh import in_thread
from tokens import locks
from tokens.models import Provider, ProviderState, Token
from tokens.services import schedule
from tokens.tasks import refresh_batch

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_queues")]


def due_now(*providers: Provider, ago: float = 0.0) -> None:
    ProviderState.objects.filter(provider__in=providers).update(
        next_run_at=timezone.now() - timedelta(seconds=ago)
    )


def test_batch__takes_on_providers_that_fall_due_while_its_requests_are_in_flight(
    settings,
) -> None:
    """A batch of one held at its endpoint: the three providers due meanwhile are claimed (each
    moved one interval on) and requested before that one answers, and so is one that falls due
    later; the dispatcher claims none of them while the batch keeps up."""
    settings.TOKENS_BATCH_PULL_EVERY = 1.0  # the dispatcher's pause lasts 4 s (4 pulls)
    settings.TOKENS_BATCH_PULL_FOR = 60.0  # taking on all along (until a second before the budget)
    with GatedEndpoint() as first, GatedEndpoint() as later:
        sent = make_provider("sent", config=oauth2_config(first.url), interval=60)
        due = [make_provider(f"due-{i}", config=oauth2_config(later.url)) for i in range(3)]
        late, last = (make_provider(n, config=oauth2_config(later.url)) for n in ("late", "last"))
        due_now(*due)
        runner, outcome = in_thread(refresh_batch, [sent.pk])
        first.wait_in_flight(1)
        later.wait_in_flight(3)
        assert all(state(p).next_run_at > timezone.now() for p in due)  # claimed: moved on
        due_now(late)
        later.wait_in_flight(4)
        # The batch keeps up (it had room for more): due now, between two of its pulls, a
        # provider is left to it; the dispatcher neither claims it nor sends anything.
        due_now(last)
        assert schedule.due_dispatch() == []
        assert broker_messages("tokens.scheduled") == []
        later.wait_in_flight(5)  # taken at the batch's next pull
        first.open()
        later.open()
        runner.join(timeout=60)
    assert outcome == [None]
    assert Token.objects.filter(provider__in=[sent, *due, late, last]).count() == 6
    assert len(first.requests) == 1 and len(later.requests) == 5


def test_batch__with_no_room_asks_for_help_and_an_empty_batch_takes_what_is_due(
    settings,
) -> None:
    """A batch at TOKENS_HTTP_CONCURRENCY takes on nothing and asks for help: the dispatcher
    claims nothing (claimed providers would wait behind busy processes) and sends an empty
    batch, which takes what is due wherever a process is free."""
    settings.TOKENS_BATCH_PULL_EVERY = 0.05
    settings.TOKENS_HTTP_CONCURRENCY = 1
    with GatedEndpoint() as endpoint:
        sent = make_provider("sent", config=oauth2_config(endpoint.url), interval=60)
        waiting = make_provider("waiting", config=oauth2_config(endpoint.url))
        due_now(waiting)
        runner, _ = in_thread(refresh_batch, [sent.pk])
        endpoint.wait_in_flight(1)
        wait_for(lambda: locks.schedule_taken() == "help", timeout=10)
        assert state(waiting).next_run_at <= timezone.now()  # not taken on: no room
        assert schedule.due_dispatch() == [[]]
        assert state(waiting).next_run_at <= timezone.now()  # nor claimed
        assert [message["args"][0] for message in broker_messages("tokens.scheduled")] == [[]]
        endpoint.open()
        runner.join(timeout=60)
        assert not Token.objects.filter(provider=waiting).exists()
        refresh_batch([])  # the empty batch, where a process is free
    assert Token.objects.filter(provider=waiting).count() == 1
    assert state(waiting).next_run_at > timezone.now()
    assert len(endpoint.requests) == 2


def test_batch__takes_on_providers_for_batch_pull_for_then_hands_the_schedule_on(
    settings,
) -> None:
    """After TOKENS_BATCH_PULL_FOR a batch only finishes what it began (so that a batch queued
    behind it never waits long), and asks for help: a provider due later is left to the
    empty batch the dispatcher sends, wherever a process is free."""
    settings.TOKENS_BATCH_PULL_EVERY = 0.05
    settings.TOKENS_BATCH_PULL_FOR = 0.5
    settings.TOKENS_DISPATCH_EVERY = 5.0  # the mark lasts a dispatch at least
    with GatedEndpoint() as endpoint:
        sent = make_provider("sent", config=oauth2_config(endpoint.url), interval=60)
        early, late = (make_provider(n, config=oauth2_config(endpoint.url)) for n in "el")
        due_now(early)
        runner, _ = in_thread(refresh_batch, [sent.pk])
        endpoint.wait_in_flight(2)  # taken on: its time to take on more is open
        wait_for(lambda: locks.schedule_taken() == "help", timeout=10)  # and over
        due_now(late)
        time.sleep(0.3)  # six pull periods
        assert state(late).next_run_at <= timezone.now()
        assert endpoint.in_flight == 2
        assert schedule.due_dispatch() == [[]]
        endpoint.open()
        runner.join(timeout=60)
    assert Token.objects.filter(provider__in=[sent, early]).count() == 2
    assert not Token.objects.filter(provider=late).exists()


def test_batch__a_provider_it_took_on_but_could_not_begin_by_its_deadline_is_handed_on(
    settings,
) -> None:
    """Taken on from the schedule, then held behind its endpoint's bound (TOKENS_HTTP_PER_HOST)
    past the batch's budget: handed on in a new batch, like the batch's own providers."""
    settings.TOKENS_BATCH_PULL_EVERY = 0.05
    settings.TOKENS_HTTP_PER_HOST = 1
    settings.TOKENS_BATCH_BUDGET = 2.0  # taking on ends a second before it
    with GatedEndpoint() as first, GatedEndpoint() as later:
        sent = make_provider("sent", config=oauth2_config(first.url), interval=60)
        taken = [make_provider(f"taken-{i}", config=oauth2_config(later.url)) for i in range(2)]
        due_now(*taken)
        started = time.monotonic()
        runner, _ = in_thread(refresh_batch, [sent.pk])
        later.wait_in_flight(1)
        assert all(state(p).next_run_at > timezone.now() for p in taken)
        wait_for(lambda: time.monotonic() > started + 2.5, timeout=10)  # past the budget
        first.open()
        later.open()
        runner.join(timeout=60)
    begun = Token.objects.get(provider__in=taken).provider
    (behind,) = [p for p in taken if p != begun]
    assert [message["args"][0] for message in broker_messages("tokens.scheduled")] == [[behind.pk]]
    assert len(later.requests) == 1


def test_due_take__leaves_the_schedule_to_the_batch_only_while_it_keeps_up(settings) -> None:
    """A take that got every due provider, none of them late, keeps up: the dispatcher sends
    nothing. One with no room for them all, or that found them waiting for long, asks for help:
    the dispatcher sends an empty batch. Either way it claims none."""
    settings.TOKENS_BATCH_PULL_EVERY = 10.0  # the mark, 20 s, outlasts the test
    providers = [make_provider(f"p-{i}", interval=60) for i in range(3)]
    assert locks.schedule_taken() is None
    due_now(*providers[:2])
    assert schedule.due_take(limit=1) == [providers[0].pk]  # full
    assert locks.schedule_taken() == "help"
    due_now(providers[2], ago=25)  # late by more than two pull periods
    assert sorted(schedule.due_take(limit=10)) == sorted([providers[1].pk, providers[2].pk])
    assert locks.schedule_taken() == "help"
    due_now(providers[0])
    assert schedule.due_dispatch() == [[]]
    assert schedule.due_take(limit=0) == []  # no room at all: only says so
    assert locks.schedule_taken() == "help"
    assert schedule.due_take(limit=10) == [providers[0].pk]  # kept up
    assert locks.schedule_taken() == "up"
    due_now(providers[0])
    assert schedule.due_dispatch() == []
    assert state(providers[0]).next_run_at <= timezone.now()  # left for the batches to take


def test_batch__a_time_limit_while_taking_on_more_stops_the_batch(settings, monkeypatch) -> None:
    """Celery's soft time limit is raised wherever the task is: inside a take it stops the
    batch like anywhere else (never swallowed as a failed take), and what was begun is handed
    on in a new batch."""
    from celery.exceptions import SoftTimeLimitExceeded

    settings.TOKENS_BATCH_PULL_EVERY = 0.05

    def limit_reached(*, limit: int) -> list[int]:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(schedule, "due_take", limit_reached)
    with GatedEndpoint() as endpoint:
        sent = make_provider("sent", config=oauth2_config(endpoint.url), interval=60)
        with pytest.raises(SoftTimeLimitExceeded):
            refresh_batch([sent.pk])  # its request is held: the first take comes meanwhile
        endpoint.open()
    assert [message["args"][0] for message in broker_messages("tokens.scheduled")] == [[sent.pk]]
    assert "time limit" in state(sent).last_error


def test_batch__a_provider_due_again_during_its_call_is_not_called_twice_but_handed_on(
    settings,
) -> None:
    """Due again while its request is in flight (a short interval, or made due by a refresh
    that found the batch's lock): the batch claims it but never begins a second call of it
    beside the first (a rotating refresh token sent twice ends the grant). It is handed on in
    a new batch, which runs once this one has let its lock go."""
    settings.TOKENS_BATCH_PULL_EVERY = 0.05
    with GatedEndpoint() as endpoint:
        config = oauth2_config(endpoint.url, scope="sent")
        sent = make_provider("sent", config=config, interval=60)
        marker = make_provider("marker", config=oauth2_config(endpoint.url, scope="marker"))

        def callers() -> list[str]:
            return [request.form["scope"] for request in endpoint.requests]

        runner, outcome = in_thread(refresh_batch, [sent.pk])
        endpoint.wait_in_flight(1)
        due_now(sent)
        wait_for(lambda: state(sent).next_run_at > timezone.now(), timeout=10)  # claimed again
        # A later pull's provider begun: anything the earlier pull took was begun before it.
        due_now(marker)
        wait_for(lambda: "marker" in callers(), timeout=10)
        assert callers() == ["sent", "marker"]  # sent once
        endpoint.open()
        runner.join(timeout=60)
        assert outcome == [None]
        assert endpoint.most_in_flight == 2
        assert [message["args"][0] for message in broker_messages("tokens.scheduled")] == [
            [sent.pk]
        ]
        assert not locks.locks_held([sent.pk])[0]  # let go: the new batch may take it
        refresh_batch([sent.pk])  # the new batch: its token is fresh now, nothing to call
    assert len(endpoint.requests) == 2
    assert Token.objects.filter(provider=sent).count() == 1


def test_batch__an_error_mid_batch_keeps_running_calls_locked_and_hands_the_batch_on_once(
    settings, monkeypatch
) -> None:
    """The database fails as a batch stores its first token, while another call is in flight:
    that call keeps its provider's lock until it expires (no refresh elsewhere overlaps it),
    and the providers the batch had claimed (each moved one interval on) are handed on in a
    new batch, after the locks' time (TOKENS_LOCK_TTL), rather than dropped until their next
    run. A batch handed on after an error that fails again hands nothing on: an error that
    persists never keeps a batch going round."""
    from django.db import OperationalError

    from tokens.constants import AFTER_ERROR_HEADER
    from tokens.services import refresh

    def unreachable(**kwargs: object) -> None:
        raise OperationalError("the database is unreachable")

    monkeypatch.setattr(refresh, "tokens_store_many", unreachable)
    with GatedEndpoint() as fast, GatedEndpoint() as held:
        first = make_provider("first", config=oauth2_config(fast.url), interval=60)
        second = make_provider("second", config=oauth2_config(held.url), interval=60)
        try:
            runner, outcome = in_thread(refresh_batch, [first.pk, second.pk])
            fast.wait_in_flight(1)
            held.wait_in_flight(1)
            fast.open()  # the first token comes back; storing it fails
            runner.join(timeout=60)
            assert [type(error) for error in outcome] == [OperationalError]
            assert held.in_flight == 1
            assert locks.locks_held([first.pk, second.pk]) == [False, True]
            (message,) = broker_messages("tokens.scheduled")
            assert message["args"][0] == [first.pk, second.pk]
            assert message["headers"][AFTER_ERROR_HEADER] == "1"
            assert message["headers"]["eta"] is not None  # after TOKENS_LOCK_TTL
            refresh_batch.push_request(**{AFTER_ERROR_HEADER: "1"})
            try:
                with pytest.raises(OperationalError):
                    refresh_batch([first.pk])
            finally:
                refresh_batch.pop_request()
            assert len(broker_messages("tokens.scheduled")) == 1
        finally:
            held.open()
    assert not Token.objects.filter(provider__in=[first, second]).exists()


def test_batch__that_kept_up_withdraws_its_mark_when_it_ends(settings) -> None:
    """A batch marks the schedule taken ("up") at each pull; when it ends, the mark goes with
    it, so the dispatcher claims what falls due at its next tick rather than a mark's life
    later."""
    settings.TOKENS_BATCH_PULL_EVERY = 0.05
    settings.TOKENS_DISPATCH_EVERY = 30.0  # the mark would last 30 s
    with GatedEndpoint() as endpoint:
        sent = make_provider("sent", config=oauth2_config(endpoint.url), interval=60)
        later = make_provider("later", interval=60)
        runner, outcome = in_thread(refresh_batch, [sent.pk])
        endpoint.wait_in_flight(1)
        wait_for(lambda: locks.schedule_taken() == "up", timeout=10)
        endpoint.open()
        runner.join(timeout=60)
    assert outcome == [None]
    assert locks.schedule_taken() is None
    due_now(later)
    assert schedule.due_dispatch() == [[later.pk]]
