"""GitHub App installation tokens: a JWT signed with the app's private key (RS256, issued 60 s
in the past, at most ten minutes long) is exchanged at
``POST {api_url}/app/installations/{installation_id}/access_tokens``
(https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/generating-an-installation-access-token-for-a-github-app).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from tokens.exceptions import GeneratorError
from tokens.generators.base import ConfigErrors, GeneratedToken, Generator, token_from_mapping
from tokens.generators.http import HttpResponse, post_json
from tokens.generators.keys import KeyProblem, check_algorithm, pem_bundle, sign_jwt
from tokens.generators.oauth2 import check_ca, endpoint_destination, url_problem

if TYPE_CHECKING:
    from tokens.models import Provider

DEFAULT_API = "https://api.github.com"
APP_ID = re.compile(r"[0-9]{1,20}|Iv[0-9A-Za-z.]{1,60}")
REPOSITORY = re.compile(r"[A-Za-z0-9_.-]{1,100}")
PERMISSION = re.compile(r"[a-z_]{1,64}")
ACCESS = frozenset({"read", "write", "admin"})
MAX_REPOSITORIES = 500
# The app's JWT: issued a minute in the past (clock drift), valid for nine minutes (GitHub
# refuses more than ten).
BACKDATE, LIFETIME = 60, 540
MESSAGE_LIMIT = 4096


class GitHubApp(Generator):
    kind = "github_app"
    label = "GitHub App installation"
    required_keys = frozenset({"app_id", "installation_id"})
    optional_keys = frozenset({"api_url", "repositories", "permissions", "ca_certs"})
    secret_required = True
    help_text = (
        "GitHub App installation access tokens (an hour long). Keys: app_id (the app's id or "
        "client id), installation_id; optional api_url (GitHub Enterprise Server, e.g. "
        "https://github.example.com/api/v3; default https://api.github.com), repositories "
        '(names, to narrow the token), permissions (e.g. {"contents": "read"}), ca_certs. '
        "The secret is the app's private key (PEM)."
    )
    example_config = {"app_id": "123456", "installation_id": 7890123}

    def check_config(self, config: Mapping[str, Any], secret: str, errors: ConfigErrors) -> None:
        app_id = config.get("app_id")
        if "app_id" in config and not (
            (isinstance(app_id, int) and not isinstance(app_id, bool) and app_id > 0)
            or (isinstance(app_id, str) and APP_ID.fullmatch(app_id))
        ):
            errors.add("config", "app_id: must be the app's numeric id or its client id")
        installation = config.get("installation_id")
        if "installation_id" in config and _installation(installation) is None:
            errors.add("config", "installation_id: must be a positive whole number")
        if "api_url" in config:
            problem = url_problem(config["api_url"])
            if problem:
                errors.add("config", f"api_url: {problem}")
        repositories = config.get("repositories", [])
        if not isinstance(repositories, list) or not all(
            isinstance(name, str) and REPOSITORY.fullmatch(name) for name in repositories
        ):
            errors.add("config", "repositories: must be a list of repository names (no owner)")
        elif len(repositories) > MAX_REPOSITORIES:
            errors.add("config", f"repositories: at most {MAX_REPOSITORIES}")
        permissions = config.get("permissions", {})
        if not isinstance(permissions, Mapping) or not all(
            isinstance(name, str) and PERMISSION.fullmatch(name) and access in ACCESS
            for name, access in permissions.items()
        ):
            errors.add(
                "config",
                'permissions: must be an object like {"contents": "read"} (read, write or admin)',
            )
        check_ca(config, errors)
        if secret:
            try:
                key_pem = pem_bundle(secret).key_pem
            except KeyProblem as unusable:
                errors.add("secret", f"the secret {unusable}")
            else:
                problem_text = check_algorithm(key_pem, "RS256")
                if problem_text:
                    errors.add("secret", f"GitHub signs with RS256: {problem_text}")

    def secret_destination(self, config: Mapping[str, Any]) -> object:
        """The app's JWT goes to the API host."""
        url = config.get("api_url") or DEFAULT_API
        return endpoint_destination(self.kind, url, config.get("ca_certs"))

    def endpoint(self, provider: Provider) -> str | None:
        url = provider.config.get("api_url") or DEFAULT_API
        return url if isinstance(url, str) else None

    def generate(self, provider: Provider) -> GeneratedToken:
        config = provider.config
        now = int(time.time())
        app_jwt = sign_jwt(
            key_pem=pem_bundle(provider.secret).key_pem,
            algorithm="RS256",
            claims={"iat": now - BACKDATE, "exp": now + LIFETIME, "iss": config["app_id"]},
            header={},
        )
        api = str(config.get("api_url") or DEFAULT_API).rstrip("/")
        url = f"{api}/app/installations/{_installation(config['installation_id'])}/access_tokens"
        narrowing = {key: config[key] for key in ("repositories", "permissions") if config.get(key)}
        response = post_json(
            url,
            data=narrowing or None,
            headers={
                "Authorization": f"Bearer {app_jwt}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
            ca_certs=config.get("ca_certs"),
        )
        return parse_installation_token(response)


def parse_installation_token(response: HttpResponse) -> GeneratedToken:
    """GitHub's answer (201 with ``token`` and ``expires_at``), or a classified error."""
    try:
        return _parse(response)
    except GeneratorError as error:
        error.sent = list(response.sent)  # the app's JWT
        raise


def _parse(response: HttpResponse) -> GeneratedToken:
    try:
        data = json.loads(response.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    status = response.status
    if 200 <= status < 300 and isinstance(data, Mapping):
        expires = data.get("expires_at")
        try:
            expires_at = datetime.fromisoformat(expires) if isinstance(expires, str) else None
        except ValueError:
            expires_at = None
        if expires_at is None:
            raise GeneratorError("GitHub gave no valid expires_at", transient=False)
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        return token_from_mapping(
            {"access_token": data.get("token"), "token_type": "Bearer", "expires_at": expires_at},
            now=response.started or datetime.now(UTC),
        )
    message = data.get("message") if isinstance(data, Mapping) else None
    detail = message[:MESSAGE_LIMIT] if isinstance(message, str) else ""
    limited = response.headers.get("x-ratelimit-remaining") == "0" or "retry-after" in (
        response.headers
    )
    transient = status >= 500 or status == 429 or (status == 403 and limited)
    if 200 <= status < 300:
        raise GeneratorError(
            f"GitHub answered HTTP {status} without a token ({response.content_type})",
            transient=True,
        )
    what = {
        401: "GitHub refused the app's JWT (app_id or private key wrong?)",
        404: "GitHub knows no such installation of this app (installation_id?)",
        422: "GitHub refused the narrowing (repositories or permissions)",
    }.get(status, f"GitHub answered HTTP {status}")
    retry_after = response.headers.get("retry-after", "")
    raise GeneratorError(
        what if what.startswith("GitHub answered") else f"{what}: HTTP {status}",
        transient=transient,
        retry_after=float(retry_after) if retry_after.isdigit() else None,
        detail=detail,
    )


def _installation(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None
