"""The dev run, the test run and the linters, run inside the virtualenv by ``dev.py``.

``run`` generates the dev secrets into the ignored file ``.state/dev.env`` on first use, starts an
embedded Redis when REDIS_URL is not set, migrates, ensures an admin user, then runs the Procfile
with honcho. SIGINT or SIGTERM stops every process, the Redis server included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from project.embedded_redis import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("DEV_STATE_DIR", ROOT / ".state")).resolve()
DEV_ENV = STATE / "dev.env"
# The embedded Redis's URL while the dev run runs.
REDIS_URL_FILE = STATE / "redis.url"
BIN = Path(sys.executable).parent


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip()
    return values


def dev_secrets() -> dict[str, str]:
    """Generate (once) and return the dev-only secrets kept in .state/dev.env."""
    from cryptography.fernet import Fernet

    values = _read_env_file(DEV_ENV)
    wanted = {
        "DJANGO_SECRET_KEY": lambda: secrets.token_urlsafe(50),
        "TOKENS_ENCRYPTION_KEYS": lambda: Fernet.generate_key().decode(),
        "FLOWER_BASIC_AUTH": lambda: f"admin:{secrets.token_urlsafe(12)}",
    }
    missing = {key: make() for key, make in wanted.items() if key not in values}
    if missing:
        STATE.mkdir(parents=True, exist_ok=True)
        values.update(missing)
        DEV_ENV.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
        DEV_ENV.chmod(0o600)
    return values


@contextmanager
def redis_url(env: dict[str, str]) -> Iterator[str]:
    """Yield REDIS_URL from the environment, or the URL of an embedded server run meanwhile."""
    if env.get("REDIS_URL"):
        yield env["REDIS_URL"]
        return
    with EmbeddedRedis(STATE / "redis") as server:
        print(f"dev: embedded Redis on {server.url}", flush=True)
        yield server.url


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=env, check=True)


def ensure_admin(env: dict[str, str]) -> None:
    username = env.get("DJANGO_SUPERUSER_USERNAME", "admin")
    password = env.get("DJANGO_SUPERUSER_PASSWORD") or secrets.token_urlsafe(12)
    # The password goes in the child's environment, which only this user can read, never in
    # its argv, which every local user can (ps, /proc/<pid>/cmdline).
    code = (
        "import os, sys\n"
        "from django.contrib.auth import get_user_model\n"
        "password = os.environ.pop('DEV_ADMIN_PASSWORD')\n"
        "User = get_user_model()\n"
        "user = User.objects.filter(username=sys.argv[1]).first()\n"
        "if user is None:\n"
        "    User.objects.create_superuser(sys.argv[1], '', password); sys.exit(0)\n"
        "if sys.argv[2] != '1': sys.exit(3)\n"
        "user.set_password(password); user.save(update_fields=['password']); sys.exit(4)\n"
    )
    result = subprocess.run(
        [
            str(BIN / "python"),
            "-c",
            f"import django; django.setup()\n{code}",
            username,
            "1" if env.get("DJANGO_SUPERUSER_PASSWORD") else "0",
        ],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "project.settings", "DEV_ADMIN_PASSWORD": password},
        check=False,
    )
    if result.returncode == 0:
        shown = (
            password
            if not env.get("DJANGO_SUPERUSER_PASSWORD")
            else "(from DJANGO_SUPERUSER_PASSWORD)"
        )
        print(
            f"dev: created admin user {username!r} with password {shown}  (shown once)", flush=True
        )
    elif result.returncode == 4:
        print(
            f"dev: admin user {username!r}: password set from DJANGO_SUPERUSER_PASSWORD", flush=True
        )
    elif result.returncode != 3:
        raise SystemExit("dev: could not create the admin user")


def with_checkout(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process of the example project: project/ is run from this checkout (the
    distribution installs only tokens/), so the checkout is on the import path."""
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def dev_env() -> dict[str, str]:
    """The environment of the dev run, and of commands run beside it."""
    env = with_checkout({**dev_secrets(), **os.environ})
    env.setdefault("DJANGO_DEBUG", "true")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["DEV_STATE_DIR"] = str(STATE)
    env.setdefault("DATABASE_URL", f"sqlite:///{STATE / 'db.sqlite3'}")
    return env


def run() -> int:
    env = dev_env()
    env.setdefault("DEV_QUIET_TASK_LOGS", "true")
    web_port = env.setdefault("DEV_WEB_PORT", "8000")
    flower_port = env.setdefault("DEV_FLOWER_PORT", "5555")
    env.setdefault("TOKENS_FLOWER_URL", f"http://127.0.0.1:{flower_port}")
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        # /tokens/metrics adds up the counters of web and worker (prometheus-client's
        # multiprocess mode); the directory must start empty.
        metrics_dir = STATE / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    embedded = not env.get("REDIS_URL")
    with redis_url(env) as url:
        env["REDIS_URL"] = url
        if embedded:
            # Commands in a second terminal (python3 dev.py manage ...) use this Redis too.
            # (A REDIS_URL of the user's own, perhaps with a password, stays in their shell.)
            descriptor = os.open(REDIS_URL_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(url)
        _manage(env, "migrate", "--no-input", "-v", "0")
        ensure_admin(env)
        print(
            f"dev: admin  http://127.0.0.1:{web_port}/admin/\n"
            f"dev: flower http://127.0.0.1:{flower_port}  (basic auth {env['FLOWER_BASIC_AUTH']})",
            flush=True,
        )
        honcho = subprocess.Popen(
            [str(BIN / "honcho"), "--procfile", "Procfile", "--app-root", str(ROOT), "start"],
            cwd=ROOT,
            env=env,
        )

        def forward(signum: int, _frame: FrameType | None) -> None:
            if honcho.poll() is None:
                honcho.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        try:
            code = honcho.wait()
        finally:
            REDIS_URL_FILE.unlink(missing_ok=True)
    print("dev: stopped", flush=True)
    return code


def _answers(url: str) -> bool:
    """Whether the Redis at ``url`` answers (a run killed hard leaves its URL behind)."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def manage(args: list[str]) -> int:
    """``manage.py`` with the dev run's settings: its database, secrets and (while it runs)
    its Redis."""
    env = dev_env()
    if not env.get("REDIS_URL"):
        if REDIS_URL_FILE.is_file() and _answers(REDIS_URL_FILE.read_text().strip()):
            env["REDIS_URL"] = REDIS_URL_FILE.read_text().strip()
        else:
            print(
                "dev: the dev run is not running: no Redis (commands that need it will say so)",
                file=sys.stderr,
                flush=True,
            )
            env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    return subprocess.call([str(BIN / "python"), "manage.py", *args], cwd=ROOT, env=env)


def test(args: list[str]) -> int:
    env = with_checkout(dict(os.environ))
    return subprocess.call([str(BIN / "python"), "-m", "pytest", *args], cwd=ROOT, env=env)


def lint() -> int:
    from cryptography.fernet import Fernet

    # mypy's Django plugin sets Django up: give it throwaway settings.
    env = {
        **with_checkout(dict(os.environ)),
        "DJANGO_SECRET_KEY": "lint",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "TOKENS_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
    }
    targets = ["project", "tokens", "tests", "bench", "dev.py"]
    failed = subprocess.call([str(BIN / "ruff"), "check", *targets], cwd=ROOT)
    failed |= subprocess.call([str(BIN / "ruff"), "format", "--check", *targets], cwd=ROOT)
    failed |= subprocess.call([str(BIN / "mypy"), "project", "tokens"], cwd=ROOT, env=env)
    # The layers of tokens/ (pyproject.toml's import-linter contracts, README's code map).
    failed |= subprocess.call([str(BIN / "lint-imports")], cwd=ROOT, env=env)
    return 1 if failed else 0


def bench(args: list[str]) -> int:
    return subprocess.call(
        [str(BIN / "python"), "-m", "bench", *args], cwd=ROOT, env=with_checkout(dict(os.environ))
    )


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "run":
        return run()
    if command == "test":
        return test(args)
    if command == "manage":
        return manage(args)
    if command == "lint":
        return lint()
    if command == "bench":
        return bench(args)
    raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
