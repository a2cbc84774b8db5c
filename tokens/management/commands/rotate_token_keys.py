from typing import Any

from django.core.management.base import BaseCommand

from tokens import services


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored secret and token with the first key of TOKENS_ENCRYPTION_KEYS. "
        "Put the new key first, keep the old ones after it, run this, then drop the old keys."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        rows = services.encryption_keys_rotate()
        self.stdout.write(self.style.SUCCESS(f"re-encrypted {rows} rows with the first key"))
