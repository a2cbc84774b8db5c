"""Schedules move from one PeriodicTask per provider to ProviderState.next_run_at and one
dispatcher entry (created after migrate by tokens.signals.install_dispatcher)."""

from datetime import timedelta

from django.db import migrations, models
from django.db.models import OuterRef, Subquery
from django.utils import timezone


def forwards(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTasks = apps.get_model("django_celery_beat", "PeriodicTasks")
    ProviderState = apps.get_model("tokens", "ProviderState")
    Token = apps.get_model("tokens", "Token")
    if PeriodicTask.objects.filter(name__startswith="tokens.refresh:").delete()[0]:
        # Historical models send no signals: tell beat its schedule changed.
        PeriodicTasks.objects.update_or_create(ident=1, defaults={"last_update": timezone.now()})
    current = Token.objects.filter(
        provider_id=OuterRef("provider_id"), version=OuterRef("current_version")
    ).values("fingerprint")[:1]
    for state in ProviderState.objects.filter(current_version__gt=0).annotate(
        current=Subquery(current)
    ):
        ProviderState.objects.filter(pk=state.pk).update(fingerprint=state.current or "")
    now = timezone.now()
    for state in ProviderState.objects.select_related("provider"):
        # Spread over one interval (golden-ratio phase), as services.schedule_sync does.
        phase = (state.provider_id * 0.6180339887498949) % 1.0
        interval = state.provider.refresh_interval or timedelta(minutes=5)
        ProviderState.objects.filter(pk=state.pk).update(next_run_at=now + interval * phase)


class Migration(migrations.Migration):
    dependencies = [
        ("tokens", "0001_initial"),
        ("django_celery_beat", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="providerstate",
            name="fingerprint",
            field=models.CharField(
                blank=True,
                help_text="Keyed hash of the current token (empty: none), to tell tokens apart.",
                max_length=16,
                verbose_name="fingerprint",
            ),
        ),
        migrations.AddField(
            model_name="providerstate",
            name="next_run_at",
            field=models.DateTimeField(
                blank=True,
                help_text="When the schedule refreshes next: one interval after the previous run.",
                null=True,
                verbose_name="next scheduled refresh",
            ),
        ),
        migrations.AddIndex(
            model_name="providerstate",
            index=models.Index(fields=["next_run_at"], name="tokens_state_next_run_at"),
        ),
        migrations.RunPython(forwards, migrations.RunPython.noop),
    ]
