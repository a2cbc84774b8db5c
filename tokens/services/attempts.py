"""Calling generators within bounds: one call in the calling thread (a Celery time limit
interrupts it); several in flight together on threads (TOKENS_HTTP_CONCURRENCY, and at most
TOKENS_HTTP_PER_HOST to one endpoint), more taken on while they are in flight, none begun after
the batch's deadline, and a call still running a TOKENS_HTTP_TIMEOUT past it given up.

Whatever a generator raises ends here as a GeneratorError, BaseException included (a
``sys.exit`` in a callable must not take a worker down), except Celery's time limits, which
belong to the task (``Interrupted`` hands the calls they stopped to the caller).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from billiard.common import (  # type: ignore[attr-defined]
    terminate_handler_fired as billiard_terminating,
)
from django.db import connections
from django.utils import timezone

from tokens.conf import tokens_settings
from tokens.exceptions import TIME_LIMITS, GeneratorError
from tokens.generators import GeneratedToken, get_generator
from tokens.generators.base import check_generated
from tokens.generators.http import origin_of
from tokens.models import Provider, Token
from tokens.services.versions import refresh_token_store, tokens_store_many

logger = logging.getLogger("tokens.refresh")

# More providers for a batch with room for ``room`` more calls: the providers and their fences.
More = Callable[[int], tuple[list[Provider], dict[int, int]]]


@dataclass
class Attempt:
    """One generator call: its provider, version, when it began, and what came of it."""

    provider: Provider
    fence: int
    attempted: datetime
    started: float
    generated: GeneratedToken | None = None
    error: GeneratorError | None = None
    finished: float | None = None
    thread: threading.Thread | None = None
    # Stored already (a rotated refresh token came with it): the stored token, or None when
    # a newer version had won.
    committed: bool = False
    stored: Token | None = None
    given_up: bool = False
    # The generator returned (or raised): false while a call given up still runs.
    returned: bool = False
    # Orders the call's end against its being given up (the batch's deadline, a time limit).
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def duration(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class Interrupted(Exception):
    """A Celery time limit stopped these calls; ``limit`` is the time limit to re-raise."""

    def __init__(self, attempts: list[Attempt], limit: BaseException) -> None:
        super().__init__("refresh stopped by the task's time limit")
        self.attempts = attempts
        self.limit = limit


# Generator calls given up while still running, by provider: no second call of a provider is
# begun in this process while its first still runs (a callable that never returns costs one
# thread, not one per attempt).
_abandoned: dict[int, Attempt] = {}


def still_running(*, provider_ids: list[int]) -> set[int]:
    """The providers whose given-up call still runs in this process."""
    for pid, attempt in list(_abandoned.items()):
        if attempt.returned:
            _abandoned.pop(pid, None)
    return {pid for pid in provider_ids if pid in _abandoned}


def attempts_run(
    *,
    providers: list[Provider],
    fences: dict[int, int],
    deadline: float | None,
    held: dict[int, str] | None,
    on_finished: Callable[[list[Attempt]], None],
    group: int = 10,
    more: More | None = None,
) -> None:
    """Call each provider's generator (see the module) and hand the attempts to
    ``on_finished``, in this thread, as they finish: ``group`` at a time, or fewer once the
    first of them has waited FLUSH_AFTER (a slow endpoint never holds back a fast one's token).

    While calls are in flight, ``more`` is asked, every TOKENS_BATCH_PULL_EVERY for
    TOKENS_BATCH_PULL_FOR (ending a second before ``deadline``), for as many providers as
    there is room for (0 while every slot is taken or providers wait for their host, and once
    when that time is over); they are called the same way. Those not begun by ``deadline``
    are left out; a call given up keeps its provider's lock (removed from ``held``) until it
    expires, so no second call can overlap it. Interrupted when a time limit stops them."""
    if len(providers) == 1 and more is None:
        attempt = Attempt(providers[0], fences[providers[0].pk], timezone.now(), time.monotonic())
        try:
            _call(attempt)
        except TIME_LIMITS as limit:
            # The call was interrupted (the limit was raised inside it): its lock may go.
            _give_up(attempt, _stopped(attempt), None)
            raise Interrupted([attempt], limit) from None
        on_finished([attempt])
        return
    _Batch(providers, fences, deadline, held, on_finished, max(1, group), more).run()


# A finished call's token waits at most this long for others to share its store (seconds).
FLUSH_AFTER = 0.1


class _Batch:
    """Several generator calls in flight together: at most TOKENS_HTTP_CONCURRENCY, and at most
    TOKENS_HTTP_PER_HOST to one endpoint origin. Providers wait per origin and are begun round
    robin over the origins that have a free slot, so a slow or saturated endpoint never takes
    the threads that others could use. The calling thread begins calls, hands finished ones
    on, and takes Celery's time limits."""

    def __init__(
        self,
        providers: list[Provider],
        fences: dict[int, int],
        deadline: float | None,
        held: dict[int, str] | None,
        on_finished: Callable[[list[Attempt]], None],
        group: int,
        more: More | None,
    ) -> None:
        self.fences, self.deadline, self.held = fences, deadline, held
        self.on_finished, self.group = on_finished, group
        self.total = max(1, int(tokens_settings.HTTP_CONCURRENCY))
        self.per_host = max(1, int(tokens_settings.HTTP_PER_HOST))
        self.waiting: OrderedDict[object, deque[Provider]] = OrderedDict()
        self._wait_for(providers)
        self.pull_every = tokens_settings.seconds("BATCH_PULL_EVERY")
        self.more = more if self.pull_every > 0 else None
        now = time.monotonic()
        self.pull_at = now + self.pull_every
        # A second before the deadline at the latest: what a pull claims is begun inside it.
        self.pull_until = now + tokens_settings.seconds("BATCH_PULL_FOR")
        if deadline is not None:
            self.pull_until = min(self.pull_until, deadline - 1.0)
        self.running: Counter[object] = Counter()
        self.in_flight = 0
        self.started: list[Attempt] = []
        self.done: list[Attempt] = []  # finished, not yet handed on
        self.done_since: float | None = None
        self.closed = False
        self.reported: set[int] = set()  # ids of the attempts put in ``done``
        self.changed = threading.Condition()
        self.cancelled = False

    def run(self) -> None:
        grace = (
            self.deadline + tokens_settings.seconds("HTTP_TIMEOUT")
            if self.deadline is not None
            else None
        )
        try:
            while True:
                ready, over, room = self._next(grace)
                if ready:
                    self.on_finished(ready)
                if over:
                    break
                if room is not None:
                    self._pull(room)
            self._close()
        except TIME_LIMITS as limit:
            running = self._stop()
            raise Interrupted([a for a in running if a.given_up], limit) from None
        except BaseException:
            # Anything else (a store failing: the database unreachable): the calls still
            # running keep their providers' locks until they expire, so that no refresh
            # elsewhere overlaps them, as after a time limit.
            self._stop()
            raise

    def _stop(self) -> list[Attempt]:
        """Begin nothing more and give up the calls still running; those calls."""
        with self.changed:
            self.cancelled = True  # a call not yet begun on its thread never begins
            running = [a for a in self.started if a.finished is None]
        for attempt in running:
            _give_up(attempt, _stopped(attempt), self.held)
        return running

    def _close(self) -> None:
        """Give up the calls still running and hand on whatever was not handed on yet."""
        with self.changed:
            self.cancelled = True
            # Not yet back in ``done``: still running, or finished a moment ago (a call that
            # ended keeps what it got: _give_up leaves it alone).
            late = [a for a in self.started if id(a) not in self.reported]
            # Finished since the last hand-on; a call ending from now on is in ``late``.
            leftover, self.done, self.closed = self.done, [], True
        for attempt in late:
            _give_up(
                attempt,
                GeneratorError(
                    f"generator {attempt.provider.kind} did not return within "
                    f"{attempt.duration:.0f}s; given up",
                    transient=True,
                    retry_after=attempt.duration,
                ),
                self.held,
            )
        if leftover or late:
            self.on_finished(leftover + late)

    def _wait_for(self, providers: list[Provider]) -> None:
        for provider in providers:
            self.waiting.setdefault(_origin(provider), deque()).append(provider)

    def _pull(self, room: int) -> None:
        """Take on up to ``room`` more providers (``more``; with no room, it only says so, as
        it does once when its time to take on more is over); a failure to get them ends the
        pulling, not the batch (the providers it had claimed are not in the results: the
        caller hands them on)."""
        now = time.monotonic()
        self.pull_at = now + self.pull_every
        more = self.more
        assert more is not None
        if now >= self.pull_until:
            self.more = None
        try:
            providers, fences = more(room)
        except TIME_LIMITS:
            raise
        except Exception:
            logger.exception("tokens: a batch could not take on more due providers")
            self.more = None
            return
        with self.changed:
            self.fences.update(fences)
            self._wait_for(providers)

    def _next(self, grace: float | None) -> tuple[list[Attempt], bool, int | None]:
        """Begin what may begin; then the attempts to hand on now, whether the batch is over
        (nothing waits or runs, or its grace has passed), and how many more providers to take
        on now (``more``; None: not now)."""
        with self.changed:
            while True:
                now = time.monotonic()
                if self.deadline is not None and now >= self.deadline:
                    self.waiting.clear()  # not begun: the caller hands them on
                while self._begin_one():
                    pass
                over = (not self.waiting and not self.in_flight) or (
                    grace is not None and now >= grace
                )
                # Room while calls are in flight and nothing waits (a saturated host's
                # providers wait: more would only queue behind them); with none, ``more`` is
                # still told, so that the schedule is taken by another process.
                pulling = self.more is not None and not over
                pull: int | None = None
                if pulling and now >= min(self.pull_at, self.pull_until):
                    full = self.waiting or now >= self.pull_until
                    pull = 0 if full else max(0, self.total - self.in_flight)
                if self.done and (
                    over
                    or pull is not None
                    or len(self.done) >= self.group
                    or (self.done_since is not None and now - self.done_since >= FLUSH_AFTER)
                ):
                    ready, self.done, self.done_since = self.done, [], None
                    return ready, over, pull
                if over or pull is not None:
                    return [], over, pull
                wake = [] if grace is None else [grace]
                if self.waiting and self.deadline is not None:
                    wake.append(self.deadline)
                if self.done_since is not None:
                    wake.append(self.done_since + FLUSH_AFTER)
                if pulling:
                    wake.append(min(self.pull_at, self.pull_until))
                self.changed.wait(timeout=max(0.0, min(wake) - now) if wake else None)

    def _begin_one(self) -> bool:
        """Begin the next provider whose origin has a free slot (round robin); under the lock."""
        if self.in_flight >= self.total:
            return False
        for origin in list(self.waiting):
            if origin is not None and self.running[origin] >= self.per_host:
                continue
            queue = self.waiting[origin]
            provider = queue.popleft()
            if queue:
                self.waiting.move_to_end(origin)
            else:
                del self.waiting[origin]
            attempt = Attempt(provider, self.fences[provider.pk], timezone.now(), time.monotonic())
            self.started.append(attempt)
            self.running[origin] += 1
            self.in_flight += 1
            _threads().submit(self._job, attempt, origin)
            return True
        return False

    def _job(self, attempt: Attempt, origin: object) -> None:
        with attempt.lock:
            if self.cancelled and attempt.given_up:
                return  # given up before its thread took it: never begun
            attempt.thread = threading.current_thread()
        try:
            _call(attempt)
        except BaseException as error:  # the process stopping: not this call's to handle
            with attempt.lock:
                attempt.returned = True
                if attempt.finished is None:
                    attempt.finished = time.monotonic()
                    attempt.error = GeneratorError(
                        f"generator {attempt.provider.kind} stopped ({type(error).__name__})",
                        transient=True,
                    )
        finally:
            connections.close_all()  # a callable may have opened one in this thread
            with self.changed:
                self.running[origin] -= 1
                self.in_flight -= 1
                if not attempt.given_up and not self.closed:
                    self.reported.add(id(attempt))
                    self.done.append(attempt)
                    if self.done_since is None:
                        self.done_since = time.monotonic()
                self.changed.notify()


class _Threads:
    """This process's threads for generator calls, kept between batches (starting a thread
    costs a GIL hand-over; a batch of 200 would pay it 200 times). A job runs on an idle
    thread, or on a new one when none is idle: a call that never returns keeps its thread, and
    the others are not fewer for it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]]] = (
            queue.SimpleQueue()
        )
        self.lock = threading.Lock()
        self.idle = 0
        self.count = 0

    def submit(self, function: Callable[..., None], *args: object) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1  # that thread takes this job
                self.jobs.put((function, args))
                return
            self.count += 1
            name = f"tokens-refresh-{self.count}"
        threading.Thread(target=self._serve, args=(function, args), name=name, daemon=True).start()

    def _serve(self, function: Callable[..., None], args: tuple[object, ...]) -> None:
        while True:
            with contextlib.suppress(BaseException):  # a job records its own failure
                function(*args)
            with self.lock:
                self.idle += 1
            function, args = self.jobs.get()


_thread_pool: list[_Threads] = []
_thread_pool_lock = threading.Lock()


def _threads() -> _Threads:
    with _thread_pool_lock:
        if not _thread_pool or _thread_pool[0].pid != os.getpid():
            _thread_pool[:] = [_Threads()]  # a forked child has none of its parent's threads
        return _thread_pool[0]


def _origin(provider: Provider) -> object:
    """The endpoint origin the provider's requests go to (None: unknown, not bounded here)."""
    try:
        url = get_generator(provider.kind).endpoint(provider)
    except Exception:  # an unknown kind, a config or secret the kind cannot read
        return None
    return origin_of(url)


def _call(attempt: Attempt) -> Attempt:
    generated: GeneratedToken | None = None
    error: GeneratorError | None = None
    try:
        generated = generator_call(provider=attempt.provider)
    except GeneratorError as failure:
        error = failure
    with attempt.lock:
        attempt.finished = time.monotonic()
        if attempt.given_up:
            # Reported failed already; but the issuer may have rotated the refresh token.
            rotated = generated.refresh_token if generated else error and error.refresh_token
            if rotated:
                refresh_token_store(provider=attempt.provider, fence=attempt.fence, value=rotated)
            attempt.returned = True
            return attempt
        attempt.generated, attempt.error = generated, error
        _commit_rotation(attempt)
        attempt.returned = True
    return attempt


def _commit_rotation(attempt: Attempt) -> None:
    """The issuer retired the refresh token it was sent: commit the new one at once (with its
    access token, one transaction), not after the rest of the batch. A process that dies
    between the issuer's answer and this commit loses the grant; this keeps that window to
    the answer's parsing."""
    if attempt.generated is not None and attempt.generated.refresh_token:
        (attempt.stored,) = tokens_store_many(
            items=[(attempt.provider, attempt.fence, attempt.generated, attempt.attempted)]
        )
        attempt.committed = True
    elif attempt.error is not None and attempt.error.refresh_token:
        refresh_token_store(
            provider=attempt.provider, fence=attempt.fence, value=attempt.error.refresh_token
        )


def _stopped(attempt: Attempt) -> GeneratorError:
    # Not the generator's failure and not to be retried at once: wait as long as it ran.
    return GeneratorError(
        f"refresh stopped by the task's time limit after {attempt.duration:.0f}s "
        "(CELERY_TASK_SOFT_TIME_LIMIT)",
        transient=True,
        retry_after=attempt.duration,
    )


def _give_up(attempt: Attempt, error: GeneratorError, held: dict[int, str] | None) -> None:
    """A generator call still running: report it failed, keep its lock (it expires by TTL).
    A call that ended meanwhile keeps what it got."""
    with attempt.lock:
        if attempt.finished is not None and not attempt.given_up and attempt.thread is not None:
            return
        attempt.given_up = True
        attempt.error = error
        attempt.generated = None
        attempt.finished = attempt.finished or time.monotonic()
    if held is not None:
        held.pop(attempt.provider.pk, None)
    if attempt.thread is not None and attempt.thread is not threading.current_thread():
        with attempt.lock:
            if not attempt.returned:
                _abandoned[attempt.provider.pk] = attempt


def generator_call(*, provider: Provider) -> GeneratedToken:
    """The provider's generator's token, checked; GeneratorError for anything else (see the
    module). Messages are scrubbed later, with the provider's secret and tokens."""
    try:
        generator = get_generator(provider.kind)
    except LookupError:
        raise GeneratorError(f"unknown generator kind {provider.kind!r}", transient=False) from None
    errors = generator.validate(provider.config, provider.secret)
    if errors:
        problems = "; ".join(message for messages in errors.values() for message in messages)
        raise GeneratorError(f"invalid provider config: {problems}", transient=False)
    generated: GeneratedToken | None = None
    try:
        generated = generator.generate(provider)
        return check_generated(generated)
    except GeneratorError as error:
        if generated is not None and generated.refresh_token and not error.refresh_token:
            error.refresh_token = generated.refresh_token  # the grant lives on in it
        raise
    except TIME_LIMITS:
        raise
    except Exception as error:  # a generator bug must not leak its text
        raise GeneratorError(
            f"generator {provider.kind} raised {type(error).__name__}", transient=True
        ) from None
    except BaseException as error:  # SystemExit, KeyboardInterrupt: never the worker's end
        if _process_is_stopping(error):
            raise
        raise GeneratorError(
            f"generator {provider.kind} raised {type(error).__name__}", transient=False
        ) from None


def _process_is_stopping(error: BaseException) -> bool:
    """Whether ``error`` is this process being stopped (not the generator's doing): a worker's
    shutdown signal (billiard's handler raised it), or Ctrl-C where Ctrl-C reaches Python."""
    if billiard_terminating():
        return True
    return (
        isinstance(error, KeyboardInterrupt)
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # pool processes ignore it
    )
