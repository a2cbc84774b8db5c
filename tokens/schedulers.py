"""Beat's scheduler for tokens: django-celery-beat's DatabaseScheduler, except that tokens'
dispatcher entry sends its task only when some provider is due. An idle fleet then sends no
bookkeeping tasks (Flower shows refreshes, not a dispatch every second) and beat logs nothing
each tick.

    CELERY_BEAT_SCHEDULER = "tokens.schedulers:DatabaseScheduler"
"""

from __future__ import annotations

import logging
from typing import Any

from django_celery_beat.schedulers import DatabaseScheduler as BeatDatabaseScheduler

from tokens import selectors
from tokens.constants import DISPATCH_TASK

logger = logging.getLogger("tokens.schedule")


class DatabaseScheduler(BeatDatabaseScheduler):
    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        if entry.task == DISPATCH_TASK:
            try:
                if not selectors.schedule_has_due():
                    return  # nothing is due: no task, no log line
            except Exception:  # cannot tell: the dispatcher finds out; beat must go on
                logger.warning("tokens: could not tell whether a refresh is due", exc_info=True)
        super().apply_entry(entry, producer=producer)
