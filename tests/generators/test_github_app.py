"""github_app against a local endpoint that checks the app JWT with the app's public key and
answers in GitHub's documented shape."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.keys import ec_key_pem, public_pem, rsa_key_pem
from tests.token_servers import GitHubAppServer
from tokens.exceptions import GeneratorError
from tokens.generators import get_generator
from tokens.models import Provider

GENERATOR = get_generator("github_app")
KEY = rsa_key_pem("github-app")


@pytest.fixture(scope="module")
def github() -> Iterator[GitHubAppServer]:
    with GitHubAppServer(app_id=424242, public_key_pem=public_pem(KEY), installations={77}) as s:
        yield s


def provider(github: GitHubAppServer, **config: object) -> Provider:
    return Provider(
        name="gh",
        kind="github_app",
        config={"app_id": 424242, "installation_id": 77, "api_url": github.url, **config},
        secret=KEY,
    )


def test_generate__installation_token_with_its_expiry(github: GitHubAppServer) -> None:
    subject = provider(github)
    assert not GENERATOR.validate(subject.config, subject.secret)
    before = datetime.now(UTC)
    token = GENERATOR.generate(subject)
    assert token.access_token.startswith("ghs_")
    assert token.expires_at is not None
    assert timedelta(minutes=59) < token.expires_at - before <= timedelta(hours=1, seconds=5)
    request = github.requests[-1]
    assert request.status == 201 and request.installation_id == 77
    claims = request.jwt.claims  # type: ignore[union-attr]
    now = time.time()
    assert claims["iss"] == 424242
    assert now - 70 <= claims["iat"] <= now - 50  # issued 60 s in the past
    assert claims["exp"] - claims["iat"] <= 600
    assert request.body is None or request.body == {}


def test_generate__narrowed_to_repositories_and_permissions(github: GitHubAppServer) -> None:
    GENERATOR.generate(
        provider(github, repositories=["api", "web"], permissions={"contents": "read"})
    )
    assert github.requests[-1].body == {
        "repositories": ["api", "web"],
        "permissions": {"contents": "read"},
    }


def test_generate__unknown_installation_is_permanent(github: GitHubAppServer) -> None:
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(provider(github, installation_id=78))
    assert "installation" in str(caught.value) and not caught.value.transient


def test_generate__another_key_is_refused(github: GitHubAppServer) -> None:
    subject = provider(github)
    subject.secret = rsa_key_pem("not-the-app")
    with pytest.raises(GeneratorError) as caught:
        GENERATOR.generate(subject)
    assert "JWT" in str(caught.value) and not caught.value.transient


@pytest.mark.parametrize(
    ("config", "secret", "field", "fragment"),
    [
        ({"app_id": "x y", "installation_id": 1}, KEY, "config", "app_id"),
        ({"app_id": 1, "installation_id": -3}, KEY, "config", "installation_id"),
        (
            {"app_id": 1, "installation_id": 1, "permissions": {"contents": "all"}},
            KEY,
            "config",
            "permissions",
        ),
        (
            {"app_id": 1, "installation_id": 1, "repositories": ["o/r"]},
            KEY,
            "config",
            "repositories",
        ),
        (
            {"app_id": 1, "installation_id": 1, "api_url": "http://github.example"},
            KEY,
            "config",
            "https",
        ),
        ({"app_id": 1, "installation_id": 1}, ec_key_pem(), "secret", "RSA"),
        ({"app_id": 1, "installation_id": 1}, "", "secret", "required"),
    ],
)
def test_validate__field_level_errors(
    config: dict[str, object], secret: str, field: str, fragment: str
) -> None:
    errors = GENERATOR.validate(config, secret)
    assert any(fragment in message for message in errors.get(field, [])), errors
