"""Management commands."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from tests.factories import counted_provider

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_queues")]


def test_refresh_token_command__prints_fingerprint_and_only_shows_the_token_when_asked() -> None:
    counted_provider()
    out = StringIO()
    call_command("refresh_token", "api", stdout=out)
    assert "fingerprint" in out.getvalue() and "api-token" not in out.getvalue()
    out = StringIO()
    call_command("refresh_token", "api", "--show", stdout=out)
    assert "api-token-2" in out.getvalue()
    with pytest.raises(CommandError, match="no token provider named 'nope'"):
        call_command("refresh_token", "nope")
