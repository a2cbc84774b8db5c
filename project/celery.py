import os
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals
from celery.utils.saferepr import saferepr
from celery.utils.serialization import jsonify, strtobool
from celery.worker import control  # Celery's own remote-control commands, registered first
from kombu.utils.url import maybe_sanitize_url

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.task_prerun.connect
@signals.task_postrun.connect
def close_stale_connections(sender: Any = None, **kwargs: Any) -> None:
    """Around each task, what Django does around each request: close a connection past
    CONN_MAX_AGE, unusable (CONN_HEALTH_CHECKS) or left in a transaction; keep the others
    (settings.CELERY_DB_REUSE_MAX stops Celery's fixup from closing them all)."""
    if not getattr(getattr(sender, "request", None), "is_eager", False):
        from django.db import close_old_connections

        close_old_connections()


@app.task(name="project.ping")
def ping() -> str:
    """Round-trip probe: proves a worker consumes from the broker and writes results."""
    return "pong"


def _censored(value: Any) -> Any:
    """Configuration as Flower may show it: credentials in any URL masked, at any depth.
    (Celery masks keys named like secrets and the broker's URL, not REDIS_URL or a cache's
    LOCATION.)"""
    if isinstance(value, Mapping):
        return {key: _censored(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_censored(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return maybe_sanitize_url(value)
    return value


@control.inspect_command(
    signature="[include_defaults=False]",
    args=[("with_defaults", strtobool)],
)
def conf(state: Any, with_defaults: bool = False, **kwargs: Any) -> Any:
    """List configuration (what Flower's Config tab shows), credentials masked."""
    return jsonify(
        _censored(state.app.conf.table(with_defaults=with_defaults)),
        keyfilter=lambda key: isinstance(key, str) and not key.startswith("__"),
        unknown_type_filter=saferepr,
    )
