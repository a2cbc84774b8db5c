"""pytest plugin (``-p project.testing`` in pyproject): the environment the suite runs in.

It runs before pytest-django loads the settings, so it can provide what they require:
REDIS_URL (an embedded redis-server unless REDIS_URL is set), a broker on the next Redis database
number (so flushing the cache database between tests never drops Celery's queue bindings), and
test-only secrets generated for this run.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from project.embedded_redis import EmbeddedRedis

_server: EmbeddedRedis | None = None

# The functions of tests/callables.py that providers of the "callable" kind may run in tests
# (TOKENS_CALLABLES; tests/test_fixtures.py checks this list against the module).
TEST_CALLABLES = [
    "tests.callables.plain_string",
    "tests.callables.mapping",
    "tests.callables.generated",
    "tests.callables.generated_forever",
    "tests.callables.explodes",
    "tests.callables.returns_number",
    "tests.callables.counted",
    "tests.callables.short_lived",
    "tests.callables.exits",
    "tests.callables.sleeps",
    "tests.callables.NOT_CALLABLE",
    "tests.callables.missing",
]


def redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def redis_db(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    global _server
    from cryptography.fernet import Fernet

    if not os.environ.get("REDIS_URL"):
        state = Path(__file__).resolve().parent.parent / ".state" / f"test-redis-{os.getpid()}"
        _server = EmbeddedRedis(state)
        os.environ["REDIS_URL"] = _server.start()
    url = os.environ["REDIS_URL"]
    os.environ.setdefault("CELERY_BROKER_URL", redis_url_with_db(url, redis_db(url) + 1))
    os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-" + os.urandom(32).hex())
    os.environ.setdefault("TOKENS_ENCRYPTION_KEYS", Fernet.generate_key().decode())
    # Integration tests use intervals of a second or two; the production minimum is 5 s.
    os.environ.setdefault("TOKENS_MIN_REFRESH_INTERVAL", "1")
    os.environ.setdefault("TOKENS_RETRY_MAX", "4")
    # Test tokens live a few seconds; the production floor is 10 s.
    os.environ.setdefault("TOKENS_MIN_LIFETIME", "1")
    os.environ.setdefault("TOKENS_CALLABLES", ",".join(TEST_CALLABLES))
    # Workers, beat and scripts the tests start import project/ and tests/ from this checkout.
    root = str(Path(__file__).resolve().parent.parent)
    paths = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def pytest_unconfigure(config: pytest.Config) -> None:
    global _server
    import sys

    if "tokens.memory" in sys.modules:  # stop listening before the server goes away
        sys.modules["tokens.memory"].listener.stop()
    if _server is not None:
        _server.stop()
        _server = None
