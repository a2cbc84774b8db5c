"""Beat's scheduler for tokens: django-celery-beat's DatabaseScheduler, except that tokens'
dispatcher entry sends its task only when some provider is due. An idle fleet then sends no
bookkeeping tasks (Flower shows refreshes, not a dispatch every second) and beat logs nothing
each tick.

    CELERY_BEAT_SCHEDULER = "tokens.schedulers:DatabaseScheduler"
"""

from __future__ import annotations

from typing import Any

from django.db import DatabaseError
from django_celery_beat.schedulers import DatabaseScheduler as BeatDatabaseScheduler

from tokens import selectors
from tokens.constants import DISPATCH_TASK


class DatabaseScheduler(BeatDatabaseScheduler):
    def apply_entry(self, entry: Any, producer: Any = None) -> None:
        if entry.task == DISPATCH_TASK:
            try:
                if not selectors.schedule_has_due():
                    return  # nothing is due: no task, no log line
            except DatabaseError:
                pass  # cannot tell: the dispatcher finds out
        super().apply_entry(entry, producer=producer)
