"""docker-compose.yml, Procfile, .env.example and README agree with each other and with settings.

Docker cannot run on the CI machine, so the compose file is checked structurally.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def procfile() -> dict[str, list[str]]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        entries[name.strip()] = shlex.split(command)
    return entries


def settings_env_vars() -> set[str]:
    source = (ROOT / "project" / "settings.py").read_text()
    return set(re.findall(r'env(?:\.\w+)?\(\s*"([A-Z_]+)"', source))


def test_compose__has_the_whole_stack() -> None:
    assert {"postgres", "redis", "web", "worker", "urgent", "beat", "flower"} <= set(SERVICES)
    for name in ("web", "worker", "urgent", "beat", "flower", "migrate"):
        assert SERVICES[name]["image"] == "tokens:latest", name
        assert SERVICES[name]["build"] == ".", name


def test_compose__runs_exactly_one_beat() -> None:
    beats = [name for name, svc in SERVICES.items() if " beat" in " ".join(svc.get("command", []))]
    assert beats == ["beat"]
    assert SERVICES["beat"]["deploy"]["replicas"] == 1
    assert not any("-B" in svc.get("command", []) for svc in SERVICES.values())


def test_compose__commands_match_the_procfile() -> None:
    processes = procfile()
    assert set(processes) == {"web", "worker", "urgent", "beat", "flower"}
    for name, program in (("worker", "worker"), ("urgent", "worker"), ("beat", "beat")):
        assert (
            SERVICES[name]["command"][:4]
            == processes[name][:4]
            == ["celery", "-A", "project", program]
        )
    assert (
        SERVICES["flower"]["command"][:3]
        == processes["flower"][:3]
        == [
            "python",
            "-m",
            "project.flower",
        ]
    )
    assert "project.wsgi:application" in SERVICES["web"]["command"]
    assert processes["web"][:3] == ["python", "manage.py", "runserver"]


def test_compose__health_checks_and_start_order() -> None:
    for name in ("postgres", "redis", "web", "worker", "urgent", "flower"):
        assert "healthcheck" in SERVICES[name], name
    for name in ("web", "worker", "urgent", "beat"):
        depends = SERVICES[name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose__flower_requires_basic_auth_from_env() -> None:
    auth = SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert auth.startswith("${FLOWER_BASIC_AUTH:?")


def test_compose__holds_no_secret_literal() -> None:
    def walk(node: object, key: str = "") -> list[tuple[str, str]]:
        if isinstance(node, dict):
            return [pair for k, v in node.items() for pair in walk(v, str(k))]
        if isinstance(node, list):
            return [pair for item in node for pair in walk(item, key)]
        return [(key, str(node))]

    secretish = re.compile(r"PASSWORD|SECRET|KEY|AUTH|TOKEN", re.I)
    for key, value in walk(COMPOSE):
        if secretish.search(key):
            assert value.startswith("${"), f"{key} has a literal value"
        # credentials inside URLs come from the environment too
        for credential in re.findall(r"://[^:/@]+:([^@]+)@", value):
            assert credential.startswith("${"), f"{key} embeds a literal password"


def test_env_example_and_readme_list_every_setting() -> None:
    example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    variables = settings_env_vars() | {
        "FLOWER_BASIC_AUTH",
        "DJANGO_SUPERUSER_USERNAME",
        "DJANGO_SUPERUSER_PASSWORD",
    }
    for name in sorted(variables):
        assert re.search(rf"^{name}=", example, re.M), f"{name} missing from .env.example"
        assert f"`{name}`" in readme, f"{name} missing from the README table"


def option(argv: list[str], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}="))


def test_lanes__each_queue_has_its_own_worker_in_the_procfile_and_compose() -> None:
    """The scheduled lane (slow endpoints queue up there) and the urgent lane (dispatcher, first
    tokens, readers) are consumed by different workers, as settings route them."""
    from django.conf import settings

    processes = procfile()
    compose = {name: svc.get("command", []) for name, svc in SERVICES.items()}
    for source in (processes, compose):
        assert option(source["worker"], "queues").split(",") == [settings.TOKENS_QUEUE_SCHEDULED]
        urgent = option(source["urgent"], "queues").split(",")
        assert settings.TOKENS_QUEUE_URGENT in urgent
        assert settings.TOKENS_QUEUE_SCHEDULED not in urgent


def test_readme__every_test_it_cites_exists() -> None:
    """The Guarantees and Security model tables name the tests that prove each line."""
    readme = (ROOT / "README.md").read_text()
    cited = set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", readme))
    assert len(cited) > 20
    for path, name in cited:
        source = (ROOT / path).read_text()
        assert not name or f"def {name}(" in source, f"{path}::{name} is gone"


def test_readme_shows_the_integration_snippets_verbatim() -> None:
    """ "Add tokens to your project" shows docs/integrate/ as it is; the foreign-project test
    applies the same files (tests/integration/test_foreign_project.py)."""
    readme = (ROOT / "README.md").read_text()
    snippets = sorted((ROOT / "docs" / "integrate").iterdir())
    assert len(snippets) == 6
    for snippet in snippets:
        assert snippet.read_text().rstrip("\n") in readme, snippet.name


def test_compose__a_stopped_worker_may_finish_the_batch_it_runs() -> None:
    """docker stop sends SIGTERM, then SIGKILL after the service's grace period (10 s unless
    set). Celery's warm shutdown finishes the running task: a batch, at most its budget plus a
    token request's timeout. Killed sooner, what the batch had claimed waits for its next run."""
    from tokens.conf import tokens_settings

    longest = tokens_settings.seconds("BATCH_BUDGET") + tokens_settings.seconds("HTTP_TIMEOUT")
    for name in ("worker", "urgent"):
        grace = re.fullmatch(r"(\d+)s", str(SERVICES[name].get("stop_grace_period", "10s")))
        assert grace is not None, name
        assert int(grace.group(1)) > longest, name
