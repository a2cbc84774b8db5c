"""Redis goes down (the server process is killed) and comes back on the same port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from pytest_httpserver import HTTPServer

from project.embedded_redis import EmbeddedRedis
from tests.factories import SECRET, oauth2_config
from tests.integration.endpoint import TokenEndpoint
from tests.processes import ROOT, child_env, run_script, start_beat, start_worker, wait_for
from tokens.models import Token

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

READER = """
import json, time
from tokens import get_token

print(json.dumps({"first": get_token("api", timeout=20)}), flush=True)
end = time.monotonic() + float(DURATION)
while time.monotonic() < end:
    started = time.monotonic()
    try:
        value, error = get_token("api", timeout=5), None
    except Exception as exc:
        value, error = None, repr(exc)
    print(json.dumps({"at": time.time(), "took": time.monotonic() - started, "value": value,
                      "error": error}), flush=True)
    time.sleep(0.05)
"""


def test_redis_down__get_token_keeps_answering_and_refreshes_resume(
    tmp_path: Path, httpserver: HTTPServer
) -> None:
    endpoint = TokenEndpoint(httpserver)
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    env = {
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url.replace("/0", "/1"),
        "CELERY_RESULT_BACKEND": url.replace("/0", "/1"),
    }
    processes = []
    try:
        processes.append(start_worker(tmp_path, hostname="redis-down", **env))
        processes.append(start_beat(tmp_path, **env))
        created = run_script(
            "from datetime import timedelta\n"
            "from tokens.models import Provider\n"
            f"Provider.objects.create(name='api', kind='oauth2_client_credentials', "
            f"config={oauth2_config(endpoint.url)!r}, secret={SECRET!r}, "
            "refresh_interval=timedelta(seconds=2))\n",
            **env,
        )
        assert created.returncode == 0, created.stderr[-2000:]

        log_path = tmp_path / "reader.log"
        prologue = (
            "import django, os\n"
            "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'project.settings')\n"
            "django.setup()\nDURATION = 12\n"
        )
        with open(log_path, "w") as log:
            reader = subprocess.Popen(
                [sys.executable, "-c", prologue + READER],
                cwd=ROOT,
                env=child_env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: '"first"' in log_path.read_text(), 20, message="the first token")
        versions_before = set(Token.objects.values_list("version", flat=True))

        server.process.kill()  # SIGKILL: the Redis server is gone
        killed_at = time.time()
        time.sleep(3)
        server.start()  # the same port, empty (it persists nothing)
        restarted_at = time.time()
        assert reader.wait(30) == 0, log_path.read_text()[-3000:]

        lines = [
            json.loads(line)
            for line in log_path.read_text().splitlines()
            if line.startswith("{") and '"at"' in line
        ]
        during = [line for line in lines if killed_at <= line["at"] <= restarted_at]
        assert len(during) > 10
        assert [line for line in lines if line["error"]] == []
        assert all(line["value"] and line["value"].startswith("tok-") for line in lines)
        assert max(line["took"] for line in during) < 1.0  # milliseconds, not a wait

        # Refreshes resume by themselves and the cache is filled again; no token row is lost.
        newest = max(versions_before)
        wait_for(
            lambda: Token.objects.filter(version__gt=newest + 1).exists(),
            20,
            message="refreshes after Redis came back",
        )
        client = redis.Redis.from_url(url)
        wait_for(lambda: client.exists("tokens:tok:api"), 10, message="the cache to be refilled")
        kept = set(Token.objects.values_list("version", flat=True))
        assert versions_before <= kept or len(kept) >= 10  # only history pruning removes rows
    finally:
        for process in processes:
            process.stop()
        server.stop()
