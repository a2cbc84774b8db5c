"""The test IdP: a real OAuth2 authorization server (django-oauth-toolkit) in its own process.

``start_idp(directory, redirect_uris=[...])`` sets it up in ``directory`` (its SQLite database,
log, and files) with one user and one Application (authorization code + PKCE, refresh tokens
that rotate; replaying a rotated-out one revokes the whole family), serves it on 127.0.0.1 on a
free port and returns an ``IdP`` once it answers. The IdP's process loads tests.idp.settings,
never the test process: this module only starts it, talks HTTP to it, and reads its files.

Its token endpoint records every request (tests.idp.middleware): ``IdP.token_requests()``.
``IdP.set_delay(before=, after=)`` holds refresh-token requests before DOT handles them, or
their answers after DOT has committed the rotation, so that a test can kill a client mid-refresh.
Starting it again on the same directory keeps the client, the user, and the tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import weakref
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin

import httpx

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = "idp.json"
DATABASE_FILE = "idp.sqlite3"
DELAY_FILE = "delay.json"
LOG_FILE = "idp.log"
RECORD_FILE = "token_requests.jsonl"
USERNAME = "alice"
PASSWORD = "alice-password-1"
START_TIMEOUT = 30.0


def token_hash(token: str) -> str:
    """SHA-256 hex of a token: how the recording and refresh_tokens() name tokens (and how DOT
    looks them up: its token_checksum)."""
    return hashlib.sha256(token.encode()).hexdigest()


class IdP:
    """A running test IdP (see start_idp). Stop it with stop() or use it as a context manager."""

    def __init__(
        self,
        *,
        directory: Path,
        base_url: str,
        client_id: str,
        client_secret: str,
        redirect_uris: list[str],
        process: subprocess.Popen[bytes],
        log_offset: int,
    ) -> None:
        self.directory = directory
        self.base_url = base_url
        self.authorize_url = f"{base_url}/o/authorize/"
        self.token_url = f"{base_url}/o/token/"
        self.revoke_url = f"{base_url}/o/revoke_token/"
        self.login_url = f"{base_url}/login/"
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = redirect_uris
        self.username = USERNAME
        self.password = PASSWORD
        self.pid = process.pid
        self._log_offset = log_offset
        # Stopped even when a test forgets to, at the latest when the test process exits.
        self._finalizer = weakref.finalize(self, _stop, process)

    def stop(self) -> None:
        """SIGTERM the IdP's process group, SIGKILL what is left of it; idempotent."""
        self._finalizer()

    def __enter__(self) -> IdP:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log(self) -> str:
        """This run's output of the IdP's process."""
        with open(self.directory / LOG_FILE, "rb") as file:
            file.seek(self._log_offset)
            return file.read().decode(errors="replace")

    def token_requests(self) -> list[dict[str, Any]]:
        """The token endpoint's requests so far, oldest first, each as recorded when DOT answered:
        time, answered (epoch seconds), grant_type, refresh_token_sha256 (or None),
        code_verifier (sent: bool), client_auth ("client_secret_basic", "client_secret_post" or
        "none"), status, error (the OAuth error code or None), delay_before, delay_after."""
        path = self.directory / RECORD_FILE
        if not path.exists():
            return []
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # only whole lines
        return [json.loads(line) for line in lines]

    def set_delay(self, before: float = 0, after: float = 0) -> None:
        """From the next refresh-token request on: sleep ``before`` seconds before DOT handles it,
        and ``after`` seconds after it did (the rotation is committed), before answering."""
        path = self.directory / DELAY_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"before": before, "after": after}))
        os.replace(temporary, path)

    def refresh_tokens(self) -> list[dict[str, Any]]:
        """DOT's RefreshToken rows, oldest first: id, sha256 (see token_hash), revoked (aware
        datetime or None), access_token_id (None once revoked), family (rotation chain id)."""
        connection = sqlite3.connect(self.directory / DATABASE_FILE, timeout=10)
        try:
            rows = connection.execute(
                "SELECT id, token_checksum, revoked, access_token_id, token_family"
                " FROM oauth2_provider_refreshtoken ORDER BY id"
            ).fetchall()
        finally:
            connection.close()
        return [
            {
                "id": id_,
                "sha256": checksum,
                "revoked": _utc(revoked),
                "access_token_id": access_token_id,
                "family": family,
            }
            for id_, checksum, revoked, access_token_id, family in rows
        ]

    def approve(self, authorize_url: str) -> str:
        """Do what alice's browser does with ``authorize_url`` (an authorization request to this
        IdP): sign in, allow the application. Returns the URL the IdP redirects to at the end
        (the client's redirect URI with code and state, or with an error), not followed."""
        with httpx.Client(timeout=10) as browser:
            response = browser.get(authorize_url)
            if _is_redirect(response) and _location(response).startswith(self.login_url):
                login_page = browser.get(_location(response))
                fields = form_fields(login_page.text, "login")
                fields.update(username=self.username, password=self.password)
                response = browser.post(self.login_url, data=fields)
                _expect(response.status_code == 302, "signing in", response)
                response = browser.get(_location(response))
            if response.status_code == 200:  # the consent page
                fields = {**form_fields(response.text, "authorizationForm"), "allow": "Authorize"}
                response = browser.post(str(response.url), data=fields)
            _expect(_is_redirect(response), "authorizing", response)
            location = _location(response)
            _expect(not location.startswith(self.base_url), "leaving the IdP", response)
            return location


def start_idp(
    directory: Path,
    *,
    access_token_seconds: int = 300,
    redirect_uris: list[str],
    skip_authorization: bool = False,
    confidential: bool = True,
) -> IdP:
    """Set up and start a test IdP in ``directory``; returns once it answers HTTP."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / CONFIG_FILE
    previous = json.loads(config_path.read_text()) if config_path.exists() else {}
    client_id = previous.get("client_id") or f"test-client-{secrets.token_hex(8)}"
    client_secret = (
        (previous.get("client_secret") or secrets.token_urlsafe(32)) if confidential else ""
    )
    config = {
        "client_id": client_id,
        "client_secret": client_secret,
        "confidential": confidential,
        "redirect_uris": redirect_uris,
        "skip_authorization": skip_authorization,
        "username": USERNAME,
        "password": PASSWORD,
    }
    config_path.write_text(json.dumps(config, indent=2))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.idp.settings",
        "IDP_DIR": str(directory),
        "IDP_ACCESS_TOKEN_SECONDS": str(access_token_seconds),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = directory / LOG_FILE
    with open(log_path, "ab") as log:
        log_offset = log.tell()
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.idp.serve", "--port", "0", "--setup"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        base_url = _wait_until_ready(process, log_path, log_offset)
    except BaseException:
        _stop(process)
        raise
    return IdP(
        directory=directory,
        base_url=base_url,
        client_id=client_id,
        client_secret=client_secret,
        redirect_uris=redirect_uris,
        process=process,
        log_offset=log_offset,
    )


def form_fields(html: str, form_id: str) -> dict[str, str]:
    """The named inputs of the form with id ``form_id`` in ``html``, as a browser posts them
    (submit buttons left out: add the one that is clicked)."""
    parser = _FormParser(form_id)
    parser.feed(html)
    if not parser.found:
        raise AssertionError(f"no form #{form_id} in the page:\n{html[:2000]}")
    return {name: i.get("value") or "" for i in parser.inputs if (name := i.get("name"))}


class _FormParser(HTMLParser):
    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id = form_id
        self.found = False
        self.inside = False
        self.inputs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form" and attributes.get("id") == self.form_id:
            self.found = self.inside = True
        elif tag == "input" and self.inside and attributes.get("type") != "submit":
            self.inputs.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False


def _wait_until_ready(process: subprocess.Popen[bytes], log_path: Path, log_offset: int) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    base_url, output = None, ""
    while time.monotonic() < deadline:
        with open(log_path, "rb") as file:
            file.seek(log_offset)
            output = file.read().decode(errors="replace")
        if process.poll() is not None:
            raise AssertionError(f"the test IdP exited ({process.returncode}):\n{output[-3000:]}")
        if base_url is None and (ready := re.search(r"IdP ready on (http://\S+)", output)):
            base_url = ready[1]
        if base_url is not None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/login/", timeout=2).status_code == 200:
                    return base_url
        time.sleep(0.05)
    raise AssertionError(f"the test IdP did not answer within {START_TIMEOUT}s:\n{output[-3000:]}")


def _stop(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    def signal_group(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            process.wait(10)
    signal_group(signal.SIGKILL)  # anything the IdP left in its group


def _utc(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value).replace(tzinfo=UTC) if value else None


def _is_redirect(response: httpx.Response) -> bool:
    return response.status_code in (301, 302, 303, 307, 308)


def _location(response: httpx.Response) -> str:
    return urljoin(str(response.url), response.headers["location"])


def _expect(condition: bool, step: str, response: httpx.Response) -> None:
    if not condition:
        raise AssertionError(
            f"test IdP, {step}: unexpected {response.status_code} from {response.url}"
            f" (location {response.headers.get('location')!r}):\n{response.text[:2000]}"
        )
