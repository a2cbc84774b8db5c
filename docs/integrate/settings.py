# --- tokens: add to your settings.py --------------------------------------------------------
import os

INSTALLED_APPS += ["django_celery_beat", "tokens"]

# Fernet keys, comma-separated: the first encrypts, all decrypt. Make one with
#   python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"
TOKENS_ENCRYPTION_KEYS = os.environ["TOKENS_ENCRYPTION_KEYS"]

# tokens keeps its cache entries, locks and notifications in Redis, through a django-redis
# cache alias of its own: add "tokens" to your CACHES ("default" here is Django's own default,
# for a project that had no CACHES).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "tokens": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": os.environ["REDIS_URL"]},
}
TOKENS_CACHE_ALIAS = "tokens"

# Celery reads these through your celery.py (namespace "CELERY"); any broker Celery supports.
CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
# django-celery-beat's DatabaseScheduler, sending tokens' dispatcher only when something is due.
CELERY_BEAT_SCHEDULER = "tokens.schedulers:DatabaseScheduler"
