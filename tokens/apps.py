from django.apps import AppConfig


class TokensConfig(AppConfig):
    name = "tokens"
    verbose_name = "Tokens"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import beat_init, worker_init

        from tokens import checks, crypto, signals  # noqa: F401 - registers checks, receivers

        # Refuse to start without encryption keys rather than store plaintext.
        crypto.check_keys()
        # Workers and beat run no Django system checks: they refuse to start the same way.
        worker_init.connect(checks.on_process_start, dispatch_uid="tokens.checks.worker")
        beat_init.connect(checks.on_process_start, dispatch_uid="tokens.checks.beat")
