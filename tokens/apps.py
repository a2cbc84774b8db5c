from django.apps import AppConfig


class TokensConfig(AppConfig):
    name = "tokens"
    verbose_name = "Tokens"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tokens import crypto, signals  # noqa: F401 - connects the Provider signals

        # Refuse to start without encryption keys rather than store plaintext.
        crypto.check_keys()
