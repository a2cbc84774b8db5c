"""Refresh throughput bounded by CPU, not by endpoint latency: a batch's token requests are in
flight together, at most TOKENS_HTTP_CONCURRENCY in a process and TOKENS_HTTP_PER_HOST to one
endpoint, over kept-alive connections. Shown with endpoints that hold each request until the
test lets it answer (tests/gated.py): counts, never clocks."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest

from tests.factories import make_provider, oauth2_config
from tests.gated import GatedEndpoint
from tests.keys import TestCA
from tests.processes import wait_for
from tests.token_servers import _server_context
from tokens import locks
from tokens.constants import Outcome, Reason
from tokens.exceptions import GeneratorError
from tokens.generators.http import post_form
from tokens.models import Token
from tokens.services import refresh

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_queues")]

FORM = "grant_type=client_credentials&client_id=c&client_secret=s"


def in_thread(function: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(function(*args, **kwargs))
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_batch__a_slow_host_never_holds_back_the_others_and_keeps_to_its_bound(settings) -> None:
    """Five providers of a slow endpoint come first in the batch, five of a fast one after:
    the slow endpoint gets its two requests (TOKENS_HTTP_PER_HOST) and not one more, while the
    fast endpoint's tokens are requested, stored and cached meanwhile."""
    settings.TOKENS_HTTP_PER_HOST = 2
    settings.TOKENS_HTTP_CONCURRENCY = 10
    with GatedEndpoint() as slow, GatedEndpoint() as fast:
        fast.open()
        held = [make_provider(f"slow-{i}", config=oauth2_config(slow.url)) for i in range(5)]
        quick = [make_provider(f"fast-{i}", config=oauth2_config(fast.url)) for i in range(5)]
        ids = [p.pk for p in held + quick]
        runner, outcome = in_thread(
            refresh.refresh_many,
            provider_ids=ids,
            reason=Reason.SCHEDULE,
            deadline=time.monotonic() + 60,
        )
        slow.wait_in_flight(2)
        wait_for(
            lambda: Token.objects.filter(provider__in=quick).count() == 5,
            timeout=30,
            message="the fast endpoint's tokens, stored while the slow one holds its requests",
        )
        assert len(fast.requests) == 5
        # Every fast request has come and gone: the slow endpoint still has its two only.
        assert len(slow.requests) == 2 and slow.in_flight == 2
        assert not Token.objects.filter(provider__in=held).exists()
        slow.release(5)
        runner.join(timeout=60)
    assert not runner.is_alive()
    (results,) = outcome
    assert {pid: result.outcome for pid, result in results.items()} == dict.fromkeys(
        ids, Outcome.STORED
    )
    assert slow.most_in_flight == 2 and len(slow.requests) == 5
    assert Token.objects.filter(provider__in=held).count() == 5


def test_batch__a_provider_is_unlocked_once_stored_while_its_batch_runs_on(settings) -> None:
    """A provider's lock goes, its readers' claim settled first, as soon as its token is stored
    (or at once, when the batch skips it), not when the batch's slowest call ends: a Refresh now
    of it meanwhile (an API rejected the new token) calls its endpoint at once instead of
    finding it "in flight"; the slow one's lock stays until its own call ends."""
    settings.TOKENS_READER_COOLDOWN = 60.0
    with GatedEndpoint() as slow, GatedEndpoint() as fast:
        fast.open()
        held = make_provider("held", config=oauth2_config(slow.url))
        done = make_provider("done", config=oauth2_config(fast.url))
        fresh = make_provider("fresh", config=oauth2_config(fast.url))
        assert refresh.token_refresh(provider_id=fresh.pk).outcome == Outcome.STORED
        locks.pending_clear(fresh.pk)  # readers may ask: the batch's skip settles it anew
        runner, outcome = in_thread(
            refresh.refresh_many,
            provider_ids=[held.pk, fresh.pk, done.pk],
            reason=Reason.SCHEDULE,
        )
        slow.wait_in_flight(1)  # every lock was taken before any call began
        wait_for(lambda: locks.locks_held([done.pk, fresh.pk]) == [False, False], timeout=30)
        assert Token.objects.filter(provider=done).count() == 1  # stored before it was unlocked
        assert not locks.claim("pending", done.pk, 1)  # readers wait out the cool-down
        assert not locks.claim("pending", fresh.pk, 1)
        assert locks.locks_held([held.pk]) == [True]
        again = refresh.token_refresh(provider_id=done.pk, reason=Reason.MANUAL)
        assert again.outcome == Outcome.STORED
        assert len(fast.requests) == 3 and slow.in_flight == 1
        slow.open()
        runner.join(timeout=60)
    assert outcome[0][held.pk].outcome == Outcome.STORED
    assert outcome[0][done.pk].outcome == Outcome.STORED
    assert outcome[0][fresh.pk].outcome == Outcome.FRESH
    assert locks.locks_held([held.pk, done.pk, fresh.pk]) == [False, False, False]
    assert Token.objects.filter(provider=done).count() == 2


def test_batch__a_lock_whose_release_failed_goes_when_the_batch_ends(
    settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis unreachable for a moment as a finished provider's lock would go: the batch keeps
    it and releases it (and settles its readers' claim) at its end, not after the lock's TTL."""
    settings.TOKENS_READER_COOLDOWN = 60.0
    release = locks.locks_release
    failed: list[dict[int, str]] = []

    def blip(held: dict[int, str], **settle: Any) -> bool:
        if not failed:
            failed.append(dict(held))
            return False  # what locks_release answers when Redis is unreachable
        return release(held, **settle)

    monkeypatch.setattr(locks, "locks_release", blip)
    with GatedEndpoint() as slow, GatedEndpoint() as fast:
        fast.open()
        held = make_provider("held", config=oauth2_config(slow.url))
        done = make_provider("done", config=oauth2_config(fast.url))
        runner, outcome = in_thread(
            refresh.refresh_many, provider_ids=[held.pk, done.pk], reason=Reason.SCHEDULE
        )
        slow.wait_in_flight(1)
        wait_for(lambda: failed, timeout=30)
        assert list(failed[0]) == [done.pk]
        assert locks.locks_held([done.pk]) == [True]
        slow.open()
        runner.join(timeout=60)
    assert outcome[0][done.pk].outcome == Outcome.STORED
    assert locks.locks_held([held.pk, done.pk]) == [False, False]
    assert not locks.claim("pending", done.pk, 1)  # settled at the end


def test_batch__a_provider_named_twice_is_called_once() -> None:
    """Ids repeated in a batch's message: one call under the lock, never a second one that
    would run after the first had let the lock go."""
    with GatedEndpoint() as endpoint:
        endpoint.open()
        provider = make_provider("twice", config=oauth2_config(endpoint.url))
        results = refresh.refresh_many(
            provider_ids=[provider.pk, provider.pk, provider.pk], reason=Reason.SCHEDULE
        )
    assert results[provider.pk].outcome == Outcome.STORED
    assert len(endpoint.requests) == 1
    assert Token.objects.filter(provider=provider).count() == 1


def test_batch__requests_to_many_hosts_are_in_flight_together_up_to_the_process_bound(
    settings,
) -> None:
    """Six endpoints, one provider each: with TOKENS_HTTP_CONCURRENCY 4, four requests are held
    at once (one at a time would be one latency per provider), and never a fifth."""
    settings.TOKENS_HTTP_PER_HOST = 50
    settings.TOKENS_HTTP_CONCURRENCY = 4
    endpoints = [GatedEndpoint() for _ in range(6)]
    try:
        providers = [
            make_provider(f"host-{i}", config=oauth2_config(e.url)) for i, e in enumerate(endpoints)
        ]
        runner, outcome = in_thread(
            refresh.refresh_many,
            provider_ids=[p.pk for p in providers],
            reason=Reason.SCHEDULE,
            deadline=time.monotonic() + 60,
        )
        wait_for(lambda: sum(e.in_flight for e in endpoints) == 4, timeout=30)
        assert sum(len(e.requests) for e in endpoints) == 4
        for endpoint in endpoints:
            endpoint.open()
        runner.join(timeout=60)
    finally:
        for endpoint in endpoints:
            endpoint.close()
    (results,) = outcome
    assert all(result.outcome == Outcome.STORED for result in results.values())
    assert Token.objects.filter(provider__in=providers).count() == 6


def test_post_form__keeps_to_the_per_host_bound_across_threads(settings) -> None:
    """Single refreshes in several threads of one process share its bound per endpoint; another
    endpoint is not held back by it."""
    settings.TOKENS_HTTP_PER_HOST = 2
    with GatedEndpoint() as slow, GatedEndpoint() as other:
        other.open()
        calls = [in_thread(post_form, slow.url, body=FORM) for _ in range(5)]
        slow.wait_in_flight(2)
        assert post_form(other.url, body=FORM).status == 200
        assert len(slow.requests) == 2
        slow.release(5)
        for thread, _ in calls:
            thread.join(timeout=30)
        assert [outcome[0].status for _, outcome in calls] == [200] * 5
        assert slow.most_in_flight == 2


def test_post_form__a_request_without_a_slot_within_the_deadline_fails_transient(
    settings,
) -> None:
    settings.TOKENS_HTTP_PER_HOST = 1
    settings.TOKENS_HTTP_TIMEOUT = 30
    with GatedEndpoint() as slow:
        first, outcome = in_thread(post_form, slow.url, body=FORM)
        slow.wait_in_flight(1)
        settings.TOKENS_HTTP_TIMEOUT = 0.3  # the second call's: its slot does not come in it
        with pytest.raises(GeneratorError, match="no request slot") as failure:
            post_form(slow.url, body=FORM)
        assert failure.value.transient
        assert len(slow.requests) == 1  # the second never reached the endpoint
        slow.open()
        first.join(timeout=30)
    assert outcome[0].status == 200


def test_post_form__keeps_the_connection_alive_between_requests() -> None:
    with GatedEndpoint() as endpoint:
        endpoint.open()
        for _ in range(3):
            assert post_form(endpoint.url, body=FORM).status == 200
    assert endpoint.connections == 1
    assert [r.connection for r in endpoint.requests] == [1, 1, 1]


def test_post_form__a_connection_made_with_one_client_certificate_never_carries_another() -> None:
    """Mutual TLS identifies the client by the certificate of the connection: a pooled
    connection of tenant A must never carry tenant B's request."""
    ca = TestCA()
    tenants = {name: "".join(ca.issue(name)) for name in ("tenant-a", "tenant-b")}
    with GatedEndpoint(tls=_server_context(ca)) as endpoint:
        endpoint.open()
        for name in ("tenant-a", "tenant-b", "tenant-a", "tenant-b"):
            response = post_form(
                endpoint.url,
                body=f"grant_type=client_credentials&client_id={name}",
                ca_certs=ca.cert_pem,
                client_cert=tenants[name],
            )
            assert response.status == 200
    assert [(r.form["client_id"], r.peer_cn) for r in endpoint.requests] == [
        ("tenant-a", "tenant-a"),
        ("tenant-b", "tenant-b"),
        ("tenant-a", "tenant-a"),
        ("tenant-b", "tenant-b"),
    ]
    # Each identity kept its own connection alive.
    assert endpoint.connections == 2


def test_post_form__no_cookie_set_for_one_request_rides_along_with_another() -> None:
    """Providers of one origin share pooled connections, never state: a cookie the endpoint
    sets in answer to one provider is not sent with the next provider's request."""
    with GatedEndpoint(set_cookie="session=tenant-a; Path=/") as endpoint:
        endpoint.open()
        for tenant in ("tenant-a", "tenant-b"):
            body = f"grant_type=client_credentials&client_id={tenant}"
            assert post_form(endpoint.url, body=body).status == 200
    assert [r.cookie for r in endpoint.requests] == [None, None]
    assert [r.connection for r in endpoint.requests] == [1, 1]  # one kept-alive connection


def _post_in_child(url: str, queue: Any) -> None:
    try:
        queue.put(post_form(url, body=FORM).status)
    except BaseException as error:
        queue.put(repr(error))


def test_post_form__works_in_a_forked_child_of_a_process_that_used_it() -> None:
    """A prefork worker's children are forks: the parent's loop thread is not in them."""
    with GatedEndpoint() as endpoint:
        endpoint.open()
        assert post_form(endpoint.url, body=FORM).status == 200
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_post_in_child, args=(endpoint.url, queue))
        child.start()
        child.join(timeout=30)
        assert queue.get(timeout=5) == 200
        assert post_form(endpoint.url, body=FORM).status == 200
