"""Capture Celery events from the broker, as Flower receives them."""

from __future__ import annotations

import threading
import time

from project.celery import app


class EventLog:
    """Every Celery event on the broker, as Flower would receive them."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self.events.append})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = False

    def _run(self) -> None:
        while not self._stop:
            try:
                self._receiver.capture(limit=None, timeout=0.5, wakeup=False)
            except (TimeoutError, OSError):
                continue

    def __enter__(self) -> EventLog:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._receiver.should_stop = True
        self._thread.join(5)
        self._connection.release()
