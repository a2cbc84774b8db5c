"""The database goes away for a web process: it serves from memory and Redis, then fails clearly.

PostgreSQL only (the suite's second CI run): the web process reaches it through a TCP proxy that
the test cuts, while the test itself keeps its own connection.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from tests.factories import make_provider
from tests.integration.tcp_proxy import TcpProxy
from tests.processes import ROOT, child_database_url, child_env, wait_for
from tokens.constants import Reason
from tokens.services import refresh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql", reason="needs PostgreSQL (the second CI run)"
    ),
]

READER = """
import json, time
from tokens import get_token

print(json.dumps({"first": get_token("api", timeout=5)}), flush=True)
end = time.monotonic() + 7
while time.monotonic() < end:
    try:
        value, error = get_token("api", timeout=0.3), None
    except Exception as exc:
        value, error = None, f"{type(exc).__name__}: {exc}"
    print(json.dumps({"at": time.time(), "value": value, "error": error}), flush=True)
    time.sleep(0.05)
"""


def test_database_down__web_process_serves_from_cache_then_fails_clearly(tmp_path: Path) -> None:
    provider = make_provider("api", kind="callable", config={"path": "tests.callables.short_lived"})
    refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
    expires_at = provider.tokens.get().expires_at.timestamp()

    database_url = child_database_url()
    host_port = database_url.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    proxied = database_url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/")
    log_path = tmp_path / "reader.log"
    prologue = (
        "import django, os\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'project.settings')\n"
        "django.setup()\n"
    )
    try:
        with open(log_path, "w") as log:
            reader = subprocess.Popen(
                [sys.executable, "-c", prologue + READER],
                cwd=ROOT,
                env=child_env(DATABASE_URL=proxied),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: '"first"' in log_path.read_text(), 20, message="the first token")
        proxy.cut()
        cut_at = time.time()
        assert reader.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        proxy.close()

    lines = [
        json.loads(line)
        for line in log_path.read_text().splitlines()
        if line.startswith("{") and '"at"' in line
    ]
    while_valid = [line for line in lines if cut_at <= line["at"] < expires_at - 0.1]
    after_expiry = [line for line in lines if line["at"] > expires_at + 0.1]
    assert len(while_valid) > 5 and len(after_expiry) > 5
    assert all(line["value"] == "api-short" for line in while_valid)  # no error while valid
    for line in after_expiry:
        assert line["value"] is None
        assert line["error"].startswith("TokenUnavailable")
        assert "database unavailable" in line["error"]
