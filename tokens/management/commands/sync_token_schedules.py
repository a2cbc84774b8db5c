from typing import Any

from django.core.management.base import BaseCommand

from tokens import services


class Command(BaseCommand):
    help = "Reconcile every provider's beat schedule (PeriodicTask); idempotent."

    def handle(self, *args: Any, **options: Any) -> None:
        report = services.schedules_sync_all()
        for action in ("created", "updated", "removed"):
            for name in report[action]:
                self.stdout.write(f"{action}: {name}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(report['created'])} created, {len(report['updated'])} updated, "
                f"{len(report['removed'])} removed, {len(report['unchanged'])} unchanged"
            )
        )
