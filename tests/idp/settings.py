"""Django settings of the test IdP (tests/idp): django-oauth-toolkit with rotating refresh tokens.

Only the IdP's own process loads them (DJANGO_SETTINGS_MODULE=tests.idp.settings, started by
tests.idp.start_idp); the test process runs on project.settings. IDP_DIR is the directory of the
IdP's SQLite database and files; IDP_ACCESS_TOKEN_SECONDS the access tokens' lifetime.
"""

from __future__ import annotations

import os
from pathlib import Path

IDP_DIR = Path(os.environ["IDP_DIR"])

SECRET_KEY = "test-idp-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",  # oauth2_provider/base.html loads static
    "oauth2_provider",
]

MIDDLEWARE = [
    # Outermost: it times and records the token endpoint's whole answer.
    "tests.idp.middleware.TokenRequestMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "tests.idp.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).resolve().parent / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": IDP_DIR / "idp.sqlite3",
        "OPTIONS": {
            # Concurrent token requests wait for each other instead of failing "locked".
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL",
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Tables straight from the models (``migrate --run-syncdb``): 0.1 s, where running the apps'
# migrations (DOT has 22) takes a second of every IdP's start.
MIGRATION_MODULES = {app.rsplit(".", 1)[-1]: None for app in INSTALLED_APPS}

# Fast hashing: a test IdP, and DOT hashes the client secret with the default hasher too.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# The IdP and the app under test both run on 127.0.0.1: cookies do not separate by port.
SESSION_COOKIE_NAME = "idp_sessionid"
CSRF_COOKIE_NAME = "idp_csrftoken"

LOGIN_URL = "/login/"
STATIC_URL = "/static/"

OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("IDP_ACCESS_TOKEN_SECONDS", "300")),
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    # Replaying a rotated-out refresh token revokes its whole family (the newest one too).
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "PKCE_REQUIRED": True,
    "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
    "SCOPES": {"read": "Reading scope", "write": "Writing scope"},
}

# Warnings and errors to the process's output (tests read it with IdP.log()). Nothing at DEBUG:
# oauthlib logs raw refresh tokens there.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
