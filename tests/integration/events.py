"""Capture Celery events from the broker, as Flower receives them (on any kombu transport)."""

from __future__ import annotations

import threading
import time
import uuid

from project.celery import app

PROBE = "tokens-test-event-log-probe"  # the event EventLog sends itself to know it receives


class EventLog:
    """Every Celery event on the broker, as Flower would receive them.

    One consumer for the whole ``with`` block, there before the block starts: entering sends
    probe events until one comes back (a consumer's queue or subscription may be in place only
    after its first poll), and the consumer is never re-created in between (on RabbitMQ its
    auto-delete queue would go, with the events sent meanwhile).
    """

    def __init__(self, ready_timeout: float = 10.0) -> None:
        self.events: list[dict[str, object]] = []
        self._ready_timeout = ready_timeout
        self._probe = uuid.uuid4().hex
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._handle})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False

    def _handle(self, event: dict[str, object]) -> None:
        if event.get("type") == PROBE:
            if event.get("probe") == self._probe:
                self._ready.set()
            return
        self.events.append(event)

    def _run(self) -> None:
        broken: tuple[type[BaseException], ...] = (
            TimeoutError,
            OSError,
            *self._connection.connection_errors,
        )
        while not self._stop:
            try:
                # No timeout: it returns once should_stop is set (checked every second).
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
            except broken as error:
                self._error = error  # the connection broke: consume again
                time.sleep(0.1)

    def __enter__(self) -> EventLog:
        self._thread.start()
        deadline = time.monotonic() + self._ready_timeout
        with app.events.default_dispatcher() as dispatcher:
            while not self._ready.wait(0.2):
                if time.monotonic() > deadline:
                    self.__exit__()
                    last = f" (last error: {self._error!r})" if self._error else ""
                    raise AssertionError(
                        f"no Celery event came back from the broker in {self._ready_timeout}s"
                        + last
                    )
                dispatcher.send(PROBE, probe=self._probe)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._receiver.should_stop = True
        self._thread.join(5)
        self._connection.release()
