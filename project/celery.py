import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="project.ping")
def ping() -> str:
    """Round-trip probe: proves a worker consumes from the broker and writes results."""
    return "pong"
