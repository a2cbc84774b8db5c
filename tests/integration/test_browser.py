"""An operator in a real browser (Playwright driving the system Chromium) adds a provider in admin
and watches it. Screenshots go to test-artifacts/screenshots/.

Skipped when no Chromium is installed, unless TOKENS_REQUIRE_BROWSER is set (CI sets it, and
installs Debian's chromium), in which case a missing browser fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator

import pytest
from django.contrib.auth.models import User
from pytest_httpserver import HTTPServer

from tests.factories import SECRET
from tests.integration.endpoint import TokenEndpoint
from tests.processes import ROOT, Process

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = (
    os.environ.get("TOKENS_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    if not CHROMIUM:
        if os.environ.get("TOKENS_REQUIRE_BROWSER"):
            pytest.fail("TOKENS_REQUIRE_BROWSER is set but no Chromium was found")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop; the ORM calls in this test are still sync.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        yield context.new_page()
        context.close()
        browser.close()


def poll(check: Callable[[], object], timeout: float, message: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {message}")


def test_browser__operator_adds_a_provider_and_watches_it(
    page, live_server, worker: Process, httpserver: HTTPServer
) -> None:
    endpoint = TokenEndpoint(httpserver)
    User.objects.create_superuser("operator", "op@example.com", "correct horse")
    sources: list[str] = []
    base = live_server.url

    def shot(name: str) -> None:
        sources.append(page.content())
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)

    # Log in.
    page.goto(f"{base}/admin/login/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "correct horse")
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")

    # Add an OAuth2 client-credentials provider against the local token endpoint.
    page.goto(f"{base}/admin/tokens/provider/add/")
    page.fill("#id_name", "payments")
    page.select_option("#id_kind", "oauth2_client_credentials")
    page.fill("#id_config", json.dumps({"token_url": endpoint.url, "client_id": "shop"}))
    page.fill("#id_secret", SECRET)
    page.fill("#id_refresh_interval", "00:05:00")
    shot("1-add-provider")
    endpoint.delay = 2.0  # the first token takes a while: the open page must catch up alone
    page.click("input[name=_continue]")
    page.wait_for_selector("#tokens-refresh-now")
    change_url = page.url

    # The list, opened before the first token exists, turns ok without a reload.
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(f"{base}/admin/tokens/provider/")
    assert page.locator(".tokens-status-ok").count() == 0
    page.wait_for_selector(".tokens-status-ok", timeout=20000)
    assert page.inner_text("td.field-status_badge") == "ok"
    assert page.inner_text("td.field-last_refresh") != "—"  # the same poll, no reload
    endpoint.delay = 0.0
    # Every column an operator scans is visible at 1280 x 800, with no sideways scrolling.
    columns = ["name", "kind", "status_badge", "expires_in", "last_refresh", "last_error"]
    for column in columns:
        box = page.locator(f"#result_list .column-{column}").bounding_box()
        assert box is not None and box["x"] + box["width"] <= 1280, column
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot("2-provider-ok")

    def fingerprint() -> str:
        page.goto(change_url)
        return page.inner_text(".field-fingerprint .readonly")

    first_fingerprint = fingerprint()
    assert len(first_fingerprint) == 12

    # Refresh now: a new fingerprint.
    page.click("#tokens-refresh-now")
    page.wait_for_selector("text=Provider payments: refresh queued.")
    shot("3-refresh-queued")
    poll(lambda: fingerprint() != first_fingerprint, 20, "a new fingerprint")
    shot("4-refreshed")
    page.set_viewport_size({"width": 1280, "height": 900})
    assert endpoint.calls == 2

    # A bad config is refused on its field.
    page.goto(change_url)
    page.fill("#id_config", json.dumps({"client_id": "shop"}))
    page.click("input[name=_continue]")
    error = page.wait_for_selector(".field-config .errorlist")
    assert "token_url: this key is required" in error.inner_text()
    shot("5-validation-error")

    # Never the secret or a token in any page the operator saw.
    page.goto(change_url)
    sources.append(page.content())
    for source in sources:
        assert SECRET not in source
        for token in endpoint.issued:
            assert token not in source


def test_browser__operator_connects_an_account(page, live_server, tmp_path) -> None:
    """Connect in a real browser: log in at the test IdP (django-oauth-toolkit), approve, and
    land back on the provider's page with its first token stored."""
    from tests.idp import start_idp
    from tokens.models import Provider, ProviderState

    base = live_server.url
    User.objects.create_superuser("operator", "op@example.com", "correct horse")
    with start_idp(tmp_path / "idp", redirect_uris=[f"{base}/tokens/connect/callback/"]) as idp:
        provider = Provider.objects.create(
            name="crm",
            kind="oauth2_refresh_token",
            config={
                "authorize_url": idp.authorize_url,
                "token_url": idp.token_url,
                "client_id": idp.client_id,
                "scope": "read",
            },
            secret=idp.client_secret,
        )
        page.goto(f"{base}/admin/login/")
        page.fill("#id_username", "operator")
        page.fill("#id_password", "correct horse")
        page.click("input[type=submit]")
        page.wait_for_selector("#site-name")

        page.goto(f"{base}/admin/tokens/provider/{provider.pk}/change/")
        assert page.inner_text("#tokens-connect") == "Connect"
        page.screenshot(path=str(SCREENSHOTS / "6-connect.png"), full_page=True)
        page.click("#tokens-connect")

        # At the IdP: sign in as its user, then approve.
        page.wait_for_selector("#login")
        page.fill("input[name=username]", idp.username)
        page.fill("input[name=password]", idp.password)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#authorizationForm")
        page.screenshot(path=str(SCREENSHOTS / "7-idp-consent.png"), full_page=True)
        page.click("input[name=allow]")

        # Back on the provider's page: connected, status ok.
        page.wait_for_selector("text=Provider crm: connected; its first token is stored.")
        assert page.url.startswith(f"{base}/admin/tokens/provider/{provider.pk}/change/")
        assert page.inner_text("#tokens-connect") == "Reconnect"
        assert page.locator(".tokens-status-ok").count() == 1
        page.screenshot(path=str(SCREENSHOTS / "8-connected.png"), full_page=True)
        refresh_token = Provider.objects.get(pk=provider.pk).refresh_token
        assert refresh_token and refresh_token not in page.content()
        assert ProviderState.objects.get(provider=provider).current_version > 0
