from typing import Any

from django.core.management.base import BaseCommand

from tokens.services import schedule


class Command(BaseCommand):
    help = (
        "Give every provider a schedule (next_run_at) and make sure beat's dispatcher entry "
        "exists; idempotent. Run it after bulk_create() or bulk .update()s, which skip signals."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        report = schedule.next_runs_sync_all()
        for action in ("created", "updated"):
            for name in report[action]:
                self.stdout.write(f"{action}: {name}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(report['created'])} created, {len(report['updated'])} updated, "
                f"{len(report['unchanged'])} unchanged"
            )
        )
