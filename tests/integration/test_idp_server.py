"""The test IdP (tests/idp) itself, over HTTP only, no tokens code: the authorization-code flow
with PKCE as a browser does it, refresh tokens that rotate (a replayed old one revokes the whole
family), revocation, the recording of the token endpoint's requests, and its delays."""

from __future__ import annotations

import os
import secrets
from base64 import urlsafe_b64encode
from collections.abc import Iterator
from hashlib import sha256
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import httpx
import pytest

from tests.idp import RECORD_FILE, IdP, form_fields, start_idp, token_hash
from tests.processes import wait_for

pytestmark = pytest.mark.integration

REDIRECT_URI = "http://127.0.0.1:9/cb/"  # never followed


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdP]:
    with start_idp(tmp_path_factory.mktemp("idp"), redirect_uris=[REDIRECT_URI]) as idp:
        yield idp


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 code challenge."""
    verifier = secrets.token_urlsafe(48)
    challenge = urlsafe_b64encode(sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorization_request(idp: IdP, state: str, challenge: str | None) -> str:
    params = {
        "response_type": "code",
        "client_id": idp.client_id,
        "redirect_uri": REDIRECT_URI,
        "state": state,
    }
    if challenge is not None:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    return f"{idp.authorize_url}?{urlencode(params)}"


def token_request(idp: IdP, data: dict[str, str], timeout: float = 10) -> httpx.Response:
    """A token request with client_secret_basic."""
    auth = (idp.client_id, idp.client_secret)
    return httpx.post(idp.token_url, data=data, auth=auth, timeout=timeout)


def code_exchange(code: str, verifier: str | None) -> dict[str, str]:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
    return data if verifier is None else {**data, "code_verifier": verifier}


def connect(idp: IdP) -> dict[str, Any]:
    """Alice authorizes the client; the client exchanges the code: the token response."""
    verifier, challenge = pkce()
    callback = idp.approve(authorization_request(idp, "s", challenge))
    code = parse_qs(urlsplit(callback).query)["code"][0]
    response = token_request(idp, code_exchange(code, verifier))
    assert response.status_code == 200, response.text
    return response.json()


def refresh(idp: IdP, refresh_token: str, timeout: float = 10) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    return token_request(idp, data, timeout=timeout)


def row(idp: IdP, token: str) -> dict[str, Any]:
    """The IdP's RefreshToken row of ``token``."""
    [found] = [r for r in idp.refresh_tokens() if r["sha256"] == token_hash(token)]
    return found


def oauth_error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json().get("error")


def test_authorization_code_flow_with_pkce__as_a_browser_does_it(idp: IdP) -> None:
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(16)
    with httpx.Client(timeout=10) as browser:
        response = browser.get(authorization_request(idp, state, challenge))
        assert response.status_code == 302
        assert response.headers["location"].startswith("/login/?next=/o/authorize/")

        login_page = browser.get(urljoin(idp.base_url, response.headers["location"]))
        fields = form_fields(login_page.text, "login")
        assert fields["csrfmiddlewaretoken"]
        assert "idp_csrftoken" in browser.cookies
        fields.update(username=idp.username, password=idp.password)
        response = browser.post(idp.login_url, data=fields)
        assert response.status_code == 302
        assert "idp_sessionid" in browser.cookies

        consent = browser.get(urljoin(idp.base_url, response.headers["location"]))
        assert consent.status_code == 200
        fields = form_fields(consent.text, "authorizationForm")
        assert fields["state"] == state
        assert (fields["code_challenge"], fields["code_challenge_method"]) == (challenge, "S256")
        response = browser.post(str(consent.url), data={**fields, "allow": "Authorize"})

    assert response.status_code == 302
    callback = urlsplit(response.headers["location"])
    assert callback._replace(query="").geturl() == REDIRECT_URI
    query = parse_qs(callback.query)
    assert query["state"] == [state]
    response = token_request(idp, code_exchange(query["code"][0], verifier))
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 300
    assert tokens["access_token"]
    assert tokens["refresh_token"]


def test_code__only_with_its_verifier_and_only_once(idp: IdP) -> None:
    callback = idp.approve(authorization_request(idp, "s", challenge=None))
    assert parse_qs(urlsplit(callback).query)["error"] == ["invalid_request"]  # PKCE required

    verifier, challenge = pkce()
    callback = idp.approve(authorization_request(idp, "s", challenge))
    code = parse_qs(urlsplit(callback).query)["code"][0]
    missing = token_request(idp, code_exchange(code, None))
    assert oauth_error(missing) == (400, "invalid_request")
    wrong = token_request(idp, code_exchange(code, pkce()[0]))
    assert oauth_error(wrong) == (400, "invalid_grant")  # and the code is still good:
    assert token_request(idp, code_exchange(code, verifier)).status_code == 200
    again = token_request(idp, code_exchange(code, verifier))
    assert oauth_error(again) == (400, "invalid_grant")


def test_refresh__rotates_and_a_replayed_old_token_revokes_the_family(idp: IdP) -> None:
    first = connect(idp)
    response = refresh(idp, first["refresh_token"])
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert row(idp, first["refresh_token"])["revoked"] is not None
    assert row(idp, second["refresh_token"])["revoked"] is None

    assert oauth_error(refresh(idp, first["refresh_token"])) == (400, "invalid_grant")
    # Reuse protection: the replay revoked the newest token of the family too.
    newest = row(idp, second["refresh_token"])
    assert newest["revoked"] is not None
    assert newest["access_token_id"] is None  # and deleted its access token
    assert oauth_error(refresh(idp, second["refresh_token"])) == (400, "invalid_grant")


def test_recording__every_token_request_with_hashes_never_the_tokens(idp: IdP) -> None:
    seen = len(idp.token_requests())
    tokens = connect(idp)
    rotated = refresh(idp, tokens["refresh_token"]).json()
    replay = httpx.post(
        idp.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": idp.client_id,
            "client_secret": idp.client_secret,
        },
        timeout=10,
    )
    assert oauth_error(replay) == (400, "invalid_grant")

    records = idp.token_requests()[seen:]
    assert [(r["grant_type"], r["client_auth"], r["status"], r["error"]) for r in records] == [
        ("authorization_code", "client_secret_basic", 200, None),
        ("refresh_token", "client_secret_basic", 200, None),
        ("refresh_token", "client_secret_post", 400, "invalid_grant"),
    ]
    assert [r["code_verifier"] for r in records] == [True, False, False]
    assert [r["refresh_token_sha256"] for r in records] == [
        None,
        token_hash(tokens["refresh_token"]),
        token_hash(tokens["refresh_token"]),
    ]
    assert all(r["time"] <= r["answered"] for r in records)
    text = (idp.directory / RECORD_FILE).read_text()
    for secret in (*tokens.values(), *rotated.values(), idp.client_secret):
        if isinstance(secret, str) and len(secret) > 8:
            assert secret not in text


def test_revoked_refresh_token__answers_invalid_grant(idp: IdP) -> None:
    tokens = connect(idp)
    revoked = httpx.post(
        idp.revoke_url,
        data={"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        auth=(idp.client_id, idp.client_secret),
        timeout=10,
    )
    assert revoked.status_code == 200
    assert row(idp, tokens["refresh_token"])["revoked"] is not None
    assert oauth_error(refresh(idp, tokens["refresh_token"])) == (400, "invalid_grant")


def test_delay_after__the_client_gives_up_once_the_rotation_is_committed(idp: IdP) -> None:
    tokens = connect(idp)
    idp.set_delay(after=5)
    try:
        with pytest.raises(httpx.ReadTimeout):
            refresh(idp, tokens["refresh_token"], timeout=0.5)
    finally:
        idp.set_delay()

    def held() -> list[dict[str, Any]]:
        sent = token_hash(tokens["refresh_token"])
        return [r for r in idp.token_requests() if r["refresh_token_sha256"] == sent]

    wait_for(held, 5, message="the held refresh in the recording")
    [record] = held()
    assert (record["status"], record["delay_after"]) == (200, 5)
    old = row(idp, tokens["refresh_token"])
    assert old["revoked"] is not None
    family = [r for r in idp.refresh_tokens() if r["family"] == old["family"]]
    assert [r["revoked"] is None for r in family] == [False, True]  # the answer the client lost
    assert oauth_error(refresh(idp, tokens["refresh_token"])) == (400, "invalid_grant")


def test_delay_before__the_client_gives_up_before_anything_happened(idp: IdP) -> None:
    tokens = connect(idp)
    idp.set_delay(before=1.5)
    try:
        with pytest.raises(httpx.ReadTimeout):
            refresh(idp, tokens["refresh_token"], timeout=0.3)
    finally:
        idp.set_delay()
    assert row(idp, tokens["refresh_token"])["revoked"] is None  # DOT has not seen it yet
    # When the delay is over DOT rotates anyway, for a client that is no longer there.
    wait_for(lambda: row(idp, tokens["refresh_token"])["revoked"], 5, message="the rotation")
    wait_for(lambda: idp.token_requests()[-1]["delay_before"] == 1.5, 5, message="the record")


def test_public_client_without_consent_page(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("public-idp")
    with start_idp(
        directory,
        redirect_uris=[REDIRECT_URI],
        confidential=False,
        skip_authorization=True,
        access_token_seconds=60,
    ) as public:
        assert public.client_secret == ""
        verifier, challenge = pkce()
        callback = public.approve(authorization_request(public, "st", challenge))
        query = parse_qs(urlsplit(callback).query)
        assert query["state"] == ["st"]
        response = httpx.post(
            public.token_url,
            data={
                "grant_type": "authorization_code",
                "code": query["code"][0],
                "redirect_uri": REDIRECT_URI,
                "client_id": public.client_id,
                "code_verifier": verifier,
            },
            timeout=10,
        )
        assert response.status_code == 200, response.text
        assert response.json()["expires_in"] == 60
        assert public.token_requests()[-1]["client_auth"] == "none"
    with pytest.raises(ProcessLookupError):  # stopped: its process group is gone
        os.killpg(public.pid, 0)
