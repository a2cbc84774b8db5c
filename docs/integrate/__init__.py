# --- tokens: add to mysite/__init__.py, so that Celery's app loads with Django --------------
from .celery import app as celery_app

__all__ = ("celery_app",)
