"""The app's settings, read lazily from Django settings (``TOKENS_*``): tests can override them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Comma-separated string or list of Fernet keys; the first encrypts, all decrypt.
    "ENCRYPTION_KEYS": [],
    # How long get_token() waits for a first token, in seconds.
    "WAIT_TIMEOUT": 10.0,
    "MIN_REFRESH_INTERVAL": timedelta(seconds=5),
    # Longest refresh interval validation accepts.
    "MAX_REFRESH_INTERVAL": timedelta(days=365),
    # Lifetime assumed when the issuer gives no expires_in and the token is no JWT with "exp".
    "DEFAULT_LIFETIME": timedelta(hours=1),
    # Lifetimes above this are clamped (a huge expires_in is taken as this); below MIN_LIFETIME
    # a token is refused (it would be gone before it could be used).
    "MAX_LIFETIME": timedelta(days=365),
    "MIN_LIFETIME": timedelta(seconds=10),
    "HISTORY": 10,
    # Deadline of a whole HTTP request to a token endpoint (connect, TLS, headers, body), in
    # seconds; and the most bytes its answer may have, as sent and once decoded.
    "HTTP_TIMEOUT": 10.0,
    "HTTP_MAX_BODY": 1024 * 1024,
    # Token requests in flight at once in one process (a batch's generators run this many at a
    # time), and at most this many of them to one endpoint origin (scheme, host, port).
    "HTTP_CONCURRENCY": 200,
    "HTTP_PER_HOST": 50,
    # TTL of the per-provider refresh lock; longer than the task's hard time limit.
    "LOCK_TTL": 90.0,
    # A refresh asked for by get_token() is not asked again for this long, in seconds; and,
    # once it is done, not before this cool-down (a token that is useless at once must not turn
    # each read into an endpoint call).
    "PENDING_TTL": 30.0,
    "READER_COOLDOWN": 1.0,
    # invalidate_token() voids a provider's token at most once per this many seconds (an API
    # that rejects every token must not turn each of its 401s into an endpoint call).
    "INVALIDATE_COOLDOWN": 30.0,
    # Fraction of a token's lifetime before its expiry at which it is refreshed (plus jitter).
    "REFRESH_MARGIN": 0.1,
    # Seconds before its expiry at which a token is no longer handed out (so that it never
    # dies in a caller's hands); None: the smaller of 5 s and 10 % of its lifetime.
    "EXPIRY_SKEW": None,
    # Backoff of failed refreshes: base * 2**(failures-1), jittered, capped; seconds.
    "RETRY_BASE": 1.0,
    "RETRY_MAX": 300.0,
    # The backoff's cap while readers want a token that no longer exists (never under 1 s).
    "RETRY_MAX_WANTED": 4.0,
    # Where the app keeps its Redis keys (django-redis alias and key prefix).
    "CACHE_ALIAS": "default",
    "REDIS_PREFIX": "tokens",
    # How long a process trusts a token in memory: while it hears change notifications, and
    # while it does not (Redis down, listener reconnecting); seconds.
    "MEMORY_MAX_AGE": 60.0,
    "MEMORY_MAX_AGE_DISCONNECTED": 1.0,
    # While waiting, re-read the stores this often in case a notification was lost; seconds.
    "WAIT_RECHECK": 0.5,
    # Beat's dispatcher entry runs this often (seconds): a schedule edit takes effect within it.
    "DISPATCH_EVERY": 1.0,
    # Scheduled refreshes per task, and at most this many claimed per dispatch. A worker
    # process runs one batch at a time: its refreshes are in flight together (up to
    # HTTP_CONCURRENCY), so a batch costs about one endpoint latency, not one per provider.
    "DISPATCH_BATCH": 200,
    "DISPATCH_LIMIT": 5000,
    # A batch stops taking providers after this long (seconds) and hands the rest to a new
    # task; with TOKENS_HTTP_TIMEOUT it must stay below CELERY_TASK_SOFT_TIME_LIMIT.
    "BATCH_BUDGET": 15.0,
    # While its requests are in flight, a batch takes the providers that have fallen due
    # since, this often (seconds) and as many as it has room for (HTTP_CONCURRENCY): a worker
    # process keeps refreshing through an endpoint's latency instead of waiting it out. 0: a
    # batch refreshes only the providers it was sent.
    "BATCH_PULL_EVERY": 0.25,
    # ... for at most this long (seconds, and ending a second before BATCH_BUDGET); then it
    # finishes what it began and the dispatcher sends to the next batch. A batch queued
    # meanwhile waits about this long plus an endpoint's latency at most.
    "BATCH_PULL_FOR": 5.0,
    # Celery queues: "urgent" carries the dispatcher and the refreshes somebody waits for (a
    # new or changed provider, a reader, an operator); "scheduled" carries batches and retries.
    # None: Celery's default routing. Consume them with separate workers, so that slow
    # endpoints in scheduled batches never hold up a first token.
    "QUEUE_URGENT": None,
    "QUEUE_SCHEDULED": None,
    # Extra generator kinds: {"kind": "dotted.path.to.GeneratorClass"}.
    "GENERATORS": {},
    # Dotted paths of the functions the "callable" kind may run (nothing else can be chosen).
    "CALLABLES": [],
    # Who may read /tokens/health/ and /tokens/metrics: "open", "staff", or "key" (a request
    # with "Authorization: Bearer <TOKENS_MONITORING_KEY>").
    "MONITORING_ACCESS": "staff",
    "MONITORING_KEY": "",
    # /tokens/metrics with a series per provider: the counters' "provider" label filled in, and
    # four gauges per enabled provider. Off: a few series whatever the number of providers.
    "METRICS_PER_PROVIDER": False,
    # Flower's base URL, for links from admin ("" for no links).
    "FLOWER_URL": "",
    # The site's public base URL (https://tokens.example.com), for the redirect URI of "Connect"
    # that the identity provider calls back; "" builds it from the admin's request.
    "PUBLIC_URL": "",
    # How long a "Connect" may take, from the click to the identity provider's answer; seconds.
    "CONNECT_TIMEOUT": 600.0,
}


class TokensSettings:
    """``tokens_settings.WAIT_TIMEOUT`` reads ``settings.TOKENS_WAIT_TIMEOUT`` or the default."""

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(name)
        return getattr(settings, f"TOKENS_{name}", DEFAULTS[name])

    def seconds(self, name: str) -> float:
        value = getattr(self, name)
        return value.total_seconds() if isinstance(value, timedelta) else float(value)

    def timedelta(self, name: str) -> timedelta:
        value = getattr(self, name)
        return value if isinstance(value, timedelta) else timedelta(seconds=float(value))

    def encryption_keys(self) -> list[str]:
        keys = self.ENCRYPTION_KEYS
        if isinstance(keys, str):
            keys = keys.split(",")
        return [key.strip() for key in keys if key and key.strip()]


tokens_settings = TokensSettings()
