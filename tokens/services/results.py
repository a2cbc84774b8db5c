"""What a refresh reports for each provider."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tokens.constants import Outcome
from tokens.models import Token


@dataclass(frozen=True)
class RefreshResult:
    outcome: Outcome
    token: Token | None = None
    error: str | None = None  # after a failure: the sanitized message (as stored)
    retry_in: float | None = None
    # After a failure or during a backoff: when readers may ask again, or never (permanent).
    retry_at: datetime | None = None
    permanent: bool = False
