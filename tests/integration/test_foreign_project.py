"""tokens installed into somebody else's project, the way the README says ("Add tokens to your
project"): the distribution is built and checked, installed from the wheel into a new virtualenv,
and a `django-admin startproject` site takes the snippets of docs/integrate/ as they are, runs
`migrate`, a Celery worker, beat on tokens' DatabaseScheduler and `runserver`, and a view of its own
reads a first token with get_token().

The foreign processes see nothing of this checkout (no PYTHONPATH, another working directory, the
installed package) and use a Redis database of the test run's server of their own, for their
cache and their broker both: the one after the suite's cache (+0), broker (+1) and
tests/test_cache.py (+2) databases. (Two more, +4 and +5, would not exist where CI runs the suite
on databases 12 and 13 of a server with the default 16.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet

from project import processes
from project.embedded_redis import free_port
from project.testing import redis_db, redis_url_with_db
from tests.processes import ROOT, wait_for
from tokens.constants import DISPATCH_ENTRY, DISPATCH_TASK, REFRESH_TASK

pytestmark = [pytest.mark.integration, pytest.mark.install]

SNIPPETS = ROOT / "docs" / "integrate"
DISTRIBUTION = "django-outbound-tokens"
# Never shipped: the example project, the tests, the benchmark.
NOT_SHIPPED = ("project/", "tests/", "bench/")
# What the foreign processes must not inherit from the test run.
INHERITED_NOT = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "REDIS_URL", "DATABASE_URL"}
INHERITED_NOT_PREFIXES = ("TOKENS_", "CELERY_", "DJANGO_")
# The project's own callable for its provider (test-only: the README leaves it to the reader).
PARTNER_TOKEN = "partner-access-token-0123456789"
PARTNER_MODULE = f'''\
def make_token(provider):
    return "{PARTNER_TOKEN}"
'''
# Test-only lines of settings.py and urls.py, after the snippets.
TEST_SETTINGS = '\nTOKENS_CALLABLES = ["mysite.partner.make_token"]\n'
TEST_URLS = """
from mysite.views import partner_status

urlpatterns += [path("partner/", partner_status)]
"""
# Run with `manage.py shell -c`: where tokens comes from, and beat's dispatcher entry.
INSPECT = (
    f"ENTRY = {DISPATCH_ENTRY!r}\n"
    + """\
import importlib.util, json, sys
import tokens
from django_celery_beat.models import PeriodicTask
entry = PeriodicTask.objects.filter(name=ENTRY).first()
print(json.dumps({
    "tokens": tokens.__file__,
    "checkout_importable": importlib.util.find_spec("project") is not None,
    "sys_path": sys.path,
    "dispatcher": entry and {"task": entry.task, "enabled": entry.enabled},
}))
"""
)
# The provider, as one would add it in admin (validated first: the callable must be listed).
ADD_PROVIDER = """\
from datetime import timedelta
from tokens.models import Provider
provider = Provider(name="partner", kind="callable", config={"path": "mysite.partner.make_token"},
                    refresh_interval=timedelta(minutes=5))
provider.full_clean()
provider.save()
"""


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """The wheel and sdist, built once from this checkout."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out)], cwd=ROOT)
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return Dist(wheel, sdist)


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{argv[:4]} failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return done.stdout


def metadata(wheel: Path) -> str:
    """The wheel's .dist-info directory: <name>-<version>.dist-info."""
    return "-".join(wheel.name.split("-")[:2]) + ".dist-info"


@pytest.mark.timeout(300)
def test_distribution__checks_and_ships_the_app_alone(dist: Dist) -> None:
    run(
        [
            str(Path(sys.executable).parent / "twine"),
            "check",
            "--strict",
            str(dist.wheel),
            str(dist.sdist),
        ],
        cwd=ROOT,
    )

    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
    app = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tokens").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    for required in (
        "tokens/migrations/0001_initial.py",
        "tokens/templates/admin/tokens/provider/change_form.html",
        "tokens/static/tokens/admin.css",
        "tokens/py.typed",
    ):
        assert required in app, required  # the list above is kept honest
    assert sorted(app - names) == [], "files of tokens/ missing from the wheel"
    extra = [n for n in names if n.split("/")[0] not in ("tokens", metadata(dist.wheel))]
    assert extra == [], "the wheel holds more than tokens/ and its metadata"

    with tarfile.open(dist.sdist) as sdist:
        members = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
    shipped = sorted(name for name in members if name.startswith(NOT_SHIPPED))
    assert shipped == [], "the sdist ships the example project, the tests or the benchmark"
    assert sorted(app - set(members)) == [], "files of tokens/ missing from the sdist"


@dataclass
class Foreign:
    """The foreign project: its virtualenv, its directory, its environment, its processes."""

    venv: Path
    root: Path
    env: dict[str, str] = field(repr=False)  # holds the encryption key
    logs: Path
    started: list[tuple[str, subprocess.Popen[bytes]]]

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def manage(self, *args: str) -> str:
        return run([self.python, "manage.py", *args], cwd=self.root, env=self.env)

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                [str(self.venv / "bin" / argv[0]), *argv[1:]],
                cwd=self.root,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started.append((name, process))
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def logs_tail(self) -> str:
        return "\n".join(f"--- {name}:\n{self.log(name)[-2500:]}" for name, _ in self.started)

    def wait_in_log(self, name: str, text: str, timeout: float) -> None:
        process = dict(self.started)[name]

        def found() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"{name} exited early:\n{self.log(name)[-3000:]}")
            return text in self.log(name)

        wait_for(found, timeout, interval=0.2, message=f"{text!r} in the {name} log")


@pytest.fixture
def foreign_redis() -> Iterator[str]:
    """A Redis database of the test run's server that nothing else uses, empty before and after."""
    url = os.environ["REDIS_URL"]
    url = redis_url_with_db(url, redis_db(url) + 3)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ResponseError as error:  # "DB index is out of range"
        pytest.fail(f"Redis database {redis_db(url)} of the test run's server: {error}")
    yield url
    client.flushdb()
    client.close()


def readme_requirements(wheel: Path) -> str:
    """docs/integrate/requirements.txt with the distribution taken from ``wheel``."""
    lines = (SNIPPETS / "requirements.txt").read_text().splitlines()
    ours = [n for n, line in enumerate(lines) if line.split("#")[0].strip() == DISTRIBUTION]
    assert len(ours) == 1, "the requirements snippet names the distribution once"
    lines[ours[0]] = f"{DISTRIBUTION} @ {wheel.resolve().as_uri()}"
    return "\n".join(lines) + "\n"


@pytest.fixture
def foreign(dist: Dist, foreign_redis: str, tmp_path: Path) -> Iterator[Foreign]:
    """A new virtualenv with the wheel installed, and an environment without this checkout."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in INHERITED_NOT and not key.startswith(INHERITED_NOT_PREFIXES)
    }
    # The README's requirements, with this wheel for the distribution; this venv's pip installs
    # them into the new one (which needs no pip of its own), from the index with pip's cache.
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(readme_requirements(dist.wheel))
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    run(
        [*pip, "install", "--quiet", "--disable-pip-version-check", "-r", str(requirements)],
        cwd=tmp_path,
        env=env,
    )
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PYTHONUNBUFFERED="1",
        REDIS_URL=foreign_redis,
        CELERY_BROKER_URL=foreign_redis,
        TOKENS_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    site = Foreign(venv, tmp_path / "foreign", env, logs, [])
    site.root.mkdir()
    try:
        yield site
    finally:
        for _, process in reversed(site.started):
            processes.stop(process, timeout=10, group=True)


def http_get(url: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()
    except OSError as error:  # not listening yet
        return 0, str(error)


@pytest.mark.timeout(600)
def test_foreign_project__takes_the_readme_snippets(foreign: Foreign) -> None:
    # django-admin startproject, then the snippets as the README shows them.
    run(
        [str(foreign.venv / "bin" / "django-admin"), "startproject", "mysite", "."],
        cwd=foreign.root,
    )
    package = foreign.root / "mysite"
    snippet = {path.name: path.read_text() for path in SNIPPETS.iterdir()}
    assert set(snippet) == {
        "requirements.txt",  # installed by the fixture
        "settings.py",
        "urls.py",
        "celery.py",
        "__init__.py",
        "views.py",
    }
    for name in ("settings.py", "urls.py", "__init__.py"):
        with (package / name).open("a") as module:
            module.write("\n" + snippet[name])
    (package / "celery.py").write_text(snippet["celery.py"])
    (package / "views.py").write_text(snippet["views.py"])
    # Test-only: the provider's function, listed in settings, and a route to the view.
    (package / "partner.py").write_text(PARTNER_MODULE)
    with (package / "settings.py").open("a") as settings:
        settings.write(TEST_SETTINGS)
    with (package / "urls.py").open("a") as urls:
        urls.write(TEST_URLS)

    foreign.manage("migrate", "--no-input")
    found = json.loads(foreign.manage("shell", "-c", INSPECT).strip().splitlines()[-1])
    site_packages = foreign.venv.resolve() / "lib"
    assert Path(found["tokens"]).resolve().is_relative_to(site_packages), found["tokens"]
    assert "site-packages" in Path(found["tokens"]).parts
    assert not found["checkout_importable"]
    assert str(ROOT) not in found["sys_path"]
    assert found["dispatcher"] == {"task": DISPATCH_TASK, "enabled": True}

    # The processes the README starts, then the site itself.
    foreign.start("worker", "celery", "-A", "mysite", "worker", "--loglevel=INFO")
    foreign.start(
        "beat",
        "celery",
        "-A",
        "mysite",
        "beat",
        "--loglevel=INFO",
    )
    port = free_port()
    foreign.start("web", "python", "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    answers: list[tuple[int, str]] = []
    try:
        foreign.wait_in_log("worker", " ready.", 60)
        # Beat runs tokens' scheduler (from the settings snippet), with the dispatcher entry.
        foreign.wait_in_log("beat", "tokens.schedulers.DatabaseScheduler", 60)
        wait_for(lambda: http_get(f"{base}/admin/login/")[0] == 200, 60, interval=0.2)

        # tokens' URLs are included: health is there, and closed to anonymous visitors.
        assert http_get(f"{base}/tokens/health/")[0] == 403

        # A provider added while everything runs; the view's get_token() waits for the worker's
        # first token (TOKENS_WAIT_TIMEOUT, 10 s: 503 if it does not come; then ask again).
        foreign.manage("shell", "-c", ADD_PROVIDER)

        def view_ok() -> bool:
            answers.append(http_get(f"{base}/partner/"))
            return answers[-1][0] == 200

        wait_for(view_ok, 60, interval=0.5, message="the view to answer 200")
        assert json.loads(answers[-1][1]) == {"ok": True, "token_length": len(PARTNER_TOKEN)}
        # The worker made it (get_token() only asks and waits).
        assert f"Task {REFRESH_TASK}[" in foreign.log("worker")
        for name, process in foreign.started:
            assert process.poll() is None, f"{name} exited"
            assert "Traceback" not in foreign.log(name), f"a traceback in the {name} log"
    except AssertionError as error:
        raise AssertionError(f"{error}\nview: {answers[-3:]}\n{foreign.logs_tail()}") from None
