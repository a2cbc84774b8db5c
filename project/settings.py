"""Django settings for the tokens project: every knob is an environment variable (.env.example)."""

import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = BASE_DIR / ".state"

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    env.read_env(BASE_DIR / ".env")

# ---------------------------------------------------------------------------- Django

SECRET_KEY = env.str("DJANGO_SECRET_KEY")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "tokens",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files with DJANGO_DEBUG off too (gunicorn in production): compressed, hashed names
    # cached for a year.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
LOGIN_URL = "admin:login"
STATIC_ROOT = env.path("DJANGO_STATIC_ROOT", default=str(STATE_DIR / "static"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "project.storage.StaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("DJANGO_LOG_LEVEL", default="INFO")},
}
# The dev run's console: about one line per refresh (tokens' own "refresh stored ..."), not
# Celery's received/succeeded pair and the HTTP client's request line besides.
if env.bool("DEV_QUIET_TASK_LOGS", default=False):
    LOGGING["loggers"] = {
        name: {"level": "WARNING"}
        for name in ("celery.app.trace", "celery.worker.strategy", "httpx", "httpcore")
    }

# ---------------------------------------------------------------------------- Database

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{STATE_DIR / 'db.sqlite3'}"),
}
# Keep connections between requests and tasks (a new PostgreSQL connection per task costs more
# than a refresh); checked before reuse.
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web, worker and beat write to one file: WAL lets readers run beside the writer, and
    # IMMEDIATE transactions queue writers on the busy timeout instead of failing at upgrade.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A file (worker and beat processes of the tests open it too), one per test run.
    DATABASES["default"]["TEST"] = {"NAME": str(STATE_DIR / f"test-db-{os.getpid()}.sqlite3")}
    STATE_DIR.mkdir(exist_ok=True)

# ---------------------------------------------------------------------------- Cache / Redis

REDIS_URL = env.str("REDIS_URL")
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=0.25)

CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {
            "SOCKET_CONNECT_TIMEOUT": REDIS_SOCKET_TIMEOUT,
            "SOCKET_TIMEOUT": REDIS_SOCKET_TIMEOUT,
        },
    },
}

# ---------------------------------------------------------------------------- Celery

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
# Redis, never the broker's URL (an amqp:// broker is no result backend); tokens' tasks store
# no result.
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=30)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=60)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Celery's Django fixup closes every database connection before and after each task unless this
# is set (celery/celery#9824): a cold first token then paid a new connection (PostgreSQL: a
# server process and authentication, several ms). With it set, tasks keep their connection like
# requests do: project/celery.py applies CONN_MAX_AGE and CONN_HEALTH_CHECKS around each task
# (Django's close_old_connections), and the fixup closes it anyway every this many tasks.
# Keep CONN_HEALTH_CHECKS on with it: a task stopped by its time limit outside a transaction can
# leave its connection busy, and the next task's health check is what reconnects.
CELERY_DB_REUSE_MAX = 1000
# Keep every countdown, time limit and lock TTL well below this (redelivery of held messages).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
# django-celery-beat's DatabaseScheduler, sending tokens' dispatcher only when something is due.
CELERY_BEAT_SCHEDULER = "tokens.schedulers:DatabaseScheduler"

# ---------------------------------------------------------------------------- tokens

TOKENS_ENCRYPTION_KEYS = env.list("TOKENS_ENCRYPTION_KEYS", default=[])
TOKENS_WAIT_TIMEOUT = env.float("TOKENS_WAIT_TIMEOUT", default=10.0)
TOKENS_MIN_REFRESH_INTERVAL = env.float("TOKENS_MIN_REFRESH_INTERVAL", default=5.0)
TOKENS_MAX_REFRESH_INTERVAL = env.float("TOKENS_MAX_REFRESH_INTERVAL", default=365 * 86400.0)
TOKENS_DEFAULT_LIFETIME = env.float("TOKENS_DEFAULT_LIFETIME", default=3600.0)
TOKENS_MIN_LIFETIME = env.float("TOKENS_MIN_LIFETIME", default=10.0)
TOKENS_HISTORY = env.int("TOKENS_HISTORY", default=10)
# A token endpoint's whole request (connect, TLS, headers, body) and the size of its answer.
TOKENS_HTTP_TIMEOUT = env.float("TOKENS_HTTP_TIMEOUT", default=10.0)
TOKENS_HTTP_MAX_BODY = env.int("TOKENS_HTTP_MAX_BODY", default=1024 * 1024)
# Longer than CELERY_TASK_TIME_LIMIT, well below the broker's visibility timeout.
TOKENS_LOCK_TTL = env.float("TOKENS_LOCK_TTL", default=CELERY_TASK_TIME_LIMIT + 30)
TOKENS_RETRY_MAX = env.float("TOKENS_RETRY_MAX", default=300.0)
TOKENS_RETRY_MAX_WANTED = env.float("TOKENS_RETRY_MAX_WANTED", default=4.0)
# Unset: the smaller of 5 s and 10 % of a token's lifetime.
TOKENS_EXPIRY_SKEW = (
    env.float("TOKENS_EXPIRY_SKEW") if env.str("TOKENS_EXPIRY_SKEW", default="") else None
)
TOKENS_READER_COOLDOWN = env.float("TOKENS_READER_COOLDOWN", default=1.0)
TOKENS_INVALIDATE_COOLDOWN = env.float("TOKENS_INVALIDATE_COOLDOWN", default=30.0)
# Beat's one entry dispatches due refreshes this often, in batches of this many providers, each
# batch calling this many generators at a time.
TOKENS_DISPATCH_EVERY = env.float("TOKENS_DISPATCH_EVERY", default=1.0)
TOKENS_DISPATCH_BATCH = env.int("TOKENS_DISPATCH_BATCH", default=200)
TOKENS_HTTP_CONCURRENCY = env.int("TOKENS_HTTP_CONCURRENCY", default=200)
TOKENS_HTTP_PER_HOST = env.int("TOKENS_HTTP_PER_HOST", default=50)
# While its requests are in flight, a batch takes on the providers that fall due, this often,
# for this long (seconds; TOKENS_BATCH_PULL_EVERY=0: never).
TOKENS_BATCH_PULL_EVERY = env.float("TOKENS_BATCH_PULL_EVERY", default=0.25)
TOKENS_BATCH_PULL_FOR = env.float("TOKENS_BATCH_PULL_FOR", default=5.0)
# Two lanes, each consumed by its own worker (Procfile, docker-compose.yml): the dispatcher and
# the refreshes somebody waits for never queue behind scheduled batches of slow endpoints.
TOKENS_QUEUE_URGENT = env.str("TOKENS_QUEUE_URGENT", default="tokens.urgent")
TOKENS_QUEUE_SCHEDULED = env.str("TOKENS_QUEUE_SCHEDULED", default="tokens.scheduled")
# The functions the "callable" kind may run (dotted paths); nothing else can be chosen in admin.
TOKENS_CALLABLES = env.list("TOKENS_CALLABLES", default=[])
# /tokens/health/ and /tokens/metrics: "open", "staff" or "key" (Authorization: Bearer <key>).
TOKENS_MONITORING_ACCESS = env.str("TOKENS_MONITORING_ACCESS", default="staff")
TOKENS_MONITORING_KEY = env.str("TOKENS_MONITORING_KEY", default="")
# /tokens/metrics with a series per provider (fine for tens of providers, not 100,000).
TOKENS_METRICS_PER_PROVIDER = env.bool("TOKENS_METRICS_PER_PROVIDER", default=False)
TOKENS_FLOWER_URL = env.str("TOKENS_FLOWER_URL", default="")
# The public base URL of this site, for the redirect URI of "Connect" ("" = from the request).
TOKENS_PUBLIC_URL = env.str("TOKENS_PUBLIC_URL", default="")
TOKENS_CONNECT_TIMEOUT = env.float("TOKENS_CONNECT_TIMEOUT", default=600.0)

# ---------------------------------------------------------------------------- examples

# The example views (project/views.py) call this API with this provider's token. They are
# mounted when DJANGO_DEBUG is on or EXAMPLE_VIEWS asks for them, for logged-in users only.
EXAMPLE_VIEWS = env.bool("EXAMPLE_VIEWS", default=False)
EXAMPLE_API_URL = env.str("EXAMPLE_API_URL", default="https://api.example.com/v1/ping")
EXAMPLE_TOKEN_PROVIDER = env.str("EXAMPLE_TOKEN_PROVIDER", default="example")
