from typing import Any

from django.core.management.base import BaseCommand, CommandError

from tokens import crypto
from tokens.exceptions import KeyRotationRefused
from tokens.services import keys


class Command(BaseCommand):
    help = (
        "Re-encrypt every stored secret and token with the first key of TOKENS_ENCRYPTION_KEYS. "
        "Put the new key first, keep the old ones after it, run this, then drop the old keys."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        fingerprints = crypto.key_fingerprints()
        self.stdout.write(
            f"encrypting with key #1 of {len(fingerprints)} (fingerprint {fingerprints[0]}); "
            f"the others only decrypt ({', '.join(fingerprints[1:]) or 'none'})"
        )
        try:
            rows = keys.encryption_keys_rotate()
        except KeyRotationRefused as error:
            raise CommandError(f"nothing rewritten: {error}") from None
        self.stdout.write(
            self.style.SUCCESS(
                f"re-encrypted {rows} rows with key #1 (fingerprint {fingerprints[0]})"
            )
        )
