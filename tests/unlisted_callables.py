"""A module no test lists in TOKENS_CALLABLES: importing it leaves a mark (its top-level code is
what choosing it in admin would run)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_marker = os.environ.get("TOKENS_TEST_IMPORT_MARKER")
if _marker:
    Path(_marker).write_text("imported")


def make_token(provider: Any) -> str:
    return "should-never-run"
