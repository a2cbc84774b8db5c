"""Calling generators within bounds: one call in the calling thread (a Celery time limit
interrupts it), several TOKENS_REFRESH_CONCURRENCY at a time on a pool, none begun after the
batch's deadline, and a call still running a TOKENS_HTTP_TIMEOUT past it given up.

Whatever a generator raises ends here as a GeneratorError, BaseException included (a
``sys.exit`` in a callable must not take a worker down), except Celery's time limits, which
belong to the task (``Interrupted`` hands the calls they stopped to the caller).
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
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
from tokens.models import Provider, Token
from tokens.services.versions import refresh_token_store, tokens_store_many


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
_abandoned: dict[int, threading.Thread] = {}


def still_running(*, provider_ids: list[int]) -> set[int]:
    """The providers whose given-up call still runs in this process."""
    for pid, thread in list(_abandoned.items()):
        if not thread.is_alive():
            del _abandoned[pid]
    return {pid for pid in provider_ids if pid in _abandoned}


def attempts_run(
    *,
    providers: list[Provider],
    fences: dict[int, int],
    deadline: float | None,
    held: dict[int, str] | None,
) -> list[Attempt]:
    """Call each provider's generator (see the module). Those not begun by ``deadline`` are
    left out; a call given up keeps its provider's lock (removed from ``held``) until it
    expires, so no second call can overlap it. Interrupted when a time limit stops them."""
    if len(providers) == 1:
        attempt = Attempt(providers[0], fences[providers[0].pk], timezone.now(), time.monotonic())
        try:
            _call(attempt)
        except TIME_LIMITS as limit:
            # The call was interrupted (the limit was raised inside it): its lock may go.
            _give_up(attempt, _stopped(attempt), None)
            raise Interrupted([attempt], limit) from None
        return [attempt]
    workers = max(1, min(len(providers), int(tokens_settings.REFRESH_CONCURRENCY)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokens-refresh")
    started: list[Attempt] = []
    begun = threading.Lock()

    def job(provider: Provider) -> Attempt | None:
        with begun:
            if deadline is not None and time.monotonic() >= deadline:
                return None  # not begun: the caller hands it on
            attempt = Attempt(provider, fences[provider.pk], timezone.now(), time.monotonic())
            attempt.thread = threading.current_thread()
            started.append(attempt)
        try:
            return _call(attempt)
        finally:
            connections.close_all()  # a callable may have opened one in this thread

    futures = [pool.submit(job, provider) for provider in providers]
    grace = deadline + tokens_settings.seconds("HTTP_TIMEOUT") if deadline is not None else None
    try:
        wait(futures, timeout=None if grace is None else max(0.0, grace - time.monotonic()))
    except TIME_LIMITS as limit:
        pool.shutdown(wait=False, cancel_futures=True)
        with begun:
            running = [a for a in started if a.finished is None]
        for attempt in running:
            _give_up(attempt, _stopped(attempt), held)
        raise Interrupted([a for a in running if a.given_up], limit) from None
    pool.shutdown(wait=False, cancel_futures=True)
    with begun:
        attempts = list(started)
    for attempt in attempts:
        if attempt.finished is None:
            _give_up(
                attempt,
                GeneratorError(
                    f"generator {attempt.provider.kind} did not return within "
                    f"{attempt.duration:.0f}s; given up",
                    transient=True,
                    retry_after=attempt.duration,
                ),
                held,
            )
    return attempts


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
            return attempt
        attempt.generated, attempt.error = generated, error
        _commit_rotation(attempt)
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
        _abandoned[attempt.provider.pk] = attempt.thread


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
