"""Per-process memory of tokens, kept honest by a pub/sub listener thread.

Every process that reads tokens keeps them in ``memory`` (name -> entry). A daemon thread
subscribes to the cache's channel; each "stored" or "changed" message drops the entry of that
provider and wakes the threads waiting for it. While the thread is not subscribed (Redis down,
reconnecting) the memory is emptied and new entries are trusted only for a short max-age.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from tokens.conf import tokens_settings
from tokens.redis_client import channel, client

logger = logging.getLogger(__name__)

# name -> (token value, trusted until (Unix time), version, token type)
Entry = tuple[str, float, int, str]
memory: dict[str, Entry] = {}


class Listener:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._generations: dict[str, int] = {}
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure_running(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self.connected.clear()
            self._stopping.clear()
            memory.clear()
            self._thread = threading.Thread(target=self._run, name="tokens-listener", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(5)
        self._thread = None
        self.connected.clear()
        memory.clear()

    def generation(self, name: str) -> int:
        """Changes every time a message about ``name`` arrives (or the connection drops)."""
        return self._generations.get(name, 0) + self._generations.get("", 0)

    @contextlib.contextmanager
    def waiter(self, name: str) -> Iterator[threading.Event]:
        """An event set on every message about ``name``; register it before reading the stores."""
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(name, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                waiters = self._waiters.get(name)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[name]

    def _wake(self, name: str | None) -> None:
        with self._lock:
            if name is None:
                events = [event for group in self._waiters.values() for event in group]
            else:
                events = list(self._waiters.get(name, ()))
        for event in events:
            event.set()

    def _handle(self, data: Any) -> None:
        try:
            message = json.loads(data)
            name, version, event = message["n"], int(message["v"]), message["e"]
        except (ValueError, KeyError, TypeError):
            logger.warning("tokens: ignoring a malformed notification")
            return
        if event == "failed":  # news for waiters only: what memory holds is still good
            self._wake(name)
            return
        self._generations[name] = self._generations.get(name, 0) + 1
        entry = memory.get(name)
        if entry is not None and (event != "stored" or entry[2] < version):
            memory.pop(name, None)
        self._wake(name)

    def _disconnected(self) -> None:
        if self.connected.is_set() and not self._stopping.is_set():
            logger.warning("tokens: lost the notification channel; trusting memory briefly")
        self.connected.clear()
        self._generations[""] = self._generations.get("", 0) + 1
        memory.clear()
        self._wake(None)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = client().pubsub()
                pubsub.subscribe(channel())
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Anything may have changed while we were not listening.
                        self._generations[""] = self._generations.get("", 0) + 1
                        memory.clear()
                        self.connected.set()
                        self._wake(None)
                        backoff = 0.05
                    elif message["type"] == "message":
                        self._handle(message["data"])
            except Exception as error:  # any failure: drop trust, reconnect with backoff
                logger.debug("tokens: notification listener error: %s", type(error).__name__)
            finally:
                self._disconnected()
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def max_age(self) -> float:
        if self.connected.is_set():
            return tokens_settings.seconds("MEMORY_MAX_AGE")
        return tokens_settings.seconds("MEMORY_MAX_AGE_DISCONNECTED")


listener = Listener()


def entry_drop(name: str, *, up_to_version: int) -> None:
    """Forget this process's entry of ``name`` if it is no newer than ``up_to_version``."""
    entry = memory.get(name)
    if entry is not None and entry[2] <= up_to_version:
        memory.pop(name, None)


def _after_fork() -> None:
    # The parent's thread and waiters do not exist here; its lock may have been held at fork.
    memory.clear()
    listener.connected.clear()
    listener._thread = None
    listener._lock = threading.Lock()
    listener._waiters.clear()


os.register_at_fork(after_in_child=_after_fork)
