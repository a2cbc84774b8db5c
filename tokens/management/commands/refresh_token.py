from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tokens.constants import Reason
from tokens.models import Provider
from tokens.services import refresh


class Command(BaseCommand):
    help = "Refresh a provider's token now; prints its fingerprint and expiry."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="provider name")
        parser.add_argument("--show", action="store_true", help="also print the token itself")

    def handle(self, *args: Any, **options: Any) -> None:
        provider = Provider.objects.filter(name=options["name"]).first()
        if provider is None:
            raise CommandError(f"no token provider named {options['name']!r}")
        result = refresh.token_refresh(provider_id=provider.pk, reason=Reason.MANUAL)
        if result.token is None:
            detail = f": {result.error}" if result.error else ""
            raise CommandError(f"{provider.name}: {result.outcome}{detail}")
        token = result.token
        expires = token.expires_at.isoformat() if token.expires_at else "never"
        self.stdout.write(
            f"{provider.name}: version {token.version}, fingerprint {token.fingerprint}, "
            f"expires {expires}"
        )
        if options["show"]:
            self.stdout.write(token.value)
