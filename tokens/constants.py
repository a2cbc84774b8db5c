"""tokens' shared vocabulary: task and entry names, message headers, why a refresh runs and what
came of it. Beat and the broker store these names as strings: they never change."""

from __future__ import annotations

import enum

REFRESH_TASK = "tokens.refresh_token"
BATCH_TASK = "tokens.refresh_batch"
DISPATCH_TASK = "tokens.dispatch_due"
DISPATCH_ENTRY = "tokens.dispatch"  # beat's one entry (a django-celery-beat PeriodicTask)
LEGACY_ENTRY_PREFIX = "tokens.refresh:"  # per-provider entries of earlier versions

# Why a refresh runs travels in a message header, so the task's arguments (what Flower and the
# task events show) are only provider ids. Scheduled batches carry none: "schedule".
REASON_HEADER = "tokens_reason"
# When the oldest provider of a scheduled batch fell due (Unix time), for the lateness metric.
DUE_HEADER = "tokens_due"
# On a batch handed on after an unexpected error (the database unreachable, say): handed on once
# only, so that an error that persists cannot keep a batch going round.
AFTER_ERROR_HEADER = "tokens_after_error"


class Reason(enum.StrEnum):
    """Why a refresh runs; it decides which skips apply."""

    SCHEDULE = "schedule"  # the schedule's run (a batch sent by the dispatcher)
    READER = "reader"  # get_token() found no valid token, or one near expiry
    RETRY = "retry"  # the backoff after a transient failure is over
    MANUAL = "manual"  # an operator, a new provider or a config change: skip nothing


class Outcome(enum.StrEnum):
    """What came of one provider's refresh."""

    STORED = "stored"
    FRESH = "skipped-fresh"
    BACKOFF = "skipped-backoff"
    IN_FLIGHT = "skipped-in-flight"
    DISABLED = "skipped-disabled"
    MISSING = "skipped-missing"
    STALE = "discarded-stale"
    FAILED = "failed"
