# --- tokens: add to your settings.py ------------------------------------------------------
import os

INSTALLED_APPS += ["django_celery_beat", "tokens"]

# Fernet keys, comma-separated: the first encrypts, all decrypt. Make one with
#   python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"
TOKENS_ENCRYPTION_KEYS = os.environ["TOKENS_ENCRYPTION_KEYS"]

# tokens keeps its cache entries, locks and notifications in Redis, through a django-redis
# cache alias of its own (keep your "default" cache as it is).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "tokens": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": os.environ["REDIS_URL"]},
}
TOKENS_CACHE_ALIAS = "tokens"

# Celery reads these through your celery.py (namespace "CELERY"); any broker Celery supports.
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
