"""Operators manage providers in Django admin."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django_celery_beat.models import PeriodicTask

from tests.factories import SECRET, make_provider
from tokens import services
from tokens.models import Provider, ProviderState

pytestmark = pytest.mark.django_db

ADD_URL = "/admin/tokens/provider/add/"


@pytest.fixture
def staff(client: Client) -> Client:
    user = User.objects.create_superuser("op", "op@example.com", "pw")
    client.force_login(user)
    return client


def form_data(**overrides: str) -> dict[str, str]:
    data = {
        "name": "payments",
        "kind": "oauth2_client_credentials",
        "enabled": "on",
        "config": json.dumps({"token_url": "https://auth.example.com/token", "client_id": "c1"}),
        "secret": SECRET,
        "refresh_interval": "00:05:00",
        "refresh_state-TOTAL_FORMS": "0",
        "refresh_state-INITIAL_FORMS": "0",
        "tokens-TOTAL_FORMS": "0",
        "tokens-INITIAL_FORMS": "0",
    }
    data.update(overrides)
    return data


def test_add__creates_a_scheduled_provider_with_an_encrypted_secret(staff: Client) -> None:
    response = staff.post(ADD_URL, form_data())
    assert response.status_code == 302, response.content.decode()[-3000:]
    provider = Provider.objects.get(name="payments")
    assert provider.secret == SECRET
    assert provider.refresh_state.next_run_at is not None  # on the schedule


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"config": json.dumps({"client_id": "c1"})}, "config", "token_url: this key is required"),
        ({"config": "{not json"}, "config", "Enter a valid JSON"),
        ({"secret": ""}, "secret", "a secret is required"),
        ({"refresh_interval": "00:00:00"}, "refresh_interval", ""),
        ({"kind": "carrier_pigeon"}, "kind", "Select a valid choice"),
        ({"name": "bad name!"}, "name", "letters, numbers"),
    ],
)
def test_add__invalid_input_is_refused_on_the_field_and_nothing_is_saved(
    staff: Client, overrides: dict[str, str], field: str, fragment: str
) -> None:
    response = staff.post(ADD_URL, form_data(**overrides))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert field in errors, errors
    assert any(fragment in message for message in errors[field])
    assert not Provider.objects.exists()
    assert not ProviderState.objects.exists()  # nothing scheduled


def test_change__secret_is_never_rendered_and_blank_keeps_it(staff: Client) -> None:
    provider = make_provider("payments", kind="static", secret=SECRET)
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    page = staff.get(url).content.decode()
    assert SECRET not in page
    assert 'type="password"' in page
    response = staff.post(url, form_data(kind="static", config="{}", secret=""))
    assert response.status_code == 302, response.content.decode()[-2000:]
    assert Provider.objects.get(pk=provider.pk).secret == SECRET


def test_pages__never_show_the_secret_or_the_token(staff: Client) -> None:
    provider = make_provider(
        "payments", kind="callable", config={"path": "tests.callables.mapping"}
    )
    services.token_refresh(provider_id=provider.pk)
    for url in ("/admin/tokens/provider/", f"/admin/tokens/provider/{provider.pk}/change/"):
        page = staff.get(url).content.decode()
        assert "mapped" not in page.replace("mapping", "")
        assert SECRET not in page
    assert (
        provider.tokens.get().fingerprint
        in staff.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    )


def test_admin__requires_staff(client: Client) -> None:
    response = client.get("/admin/tokens/provider/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    User.objects.create_user("plain", password="pw")
    client.login(username="plain", password="pw")
    assert client.get("/admin/tokens/provider/").status_code == 302


def test_actions__refresh_now_enable_disable(
    staff: Client, django_capture_on_commit_callbacks
) -> None:
    provider = make_provider("payments", kind="static", secret=SECRET)
    with django_capture_on_commit_callbacks() as callbacks:
        response = staff.post(
            "/admin/tokens/provider/",
            {"action": "refresh_now", "_selected_action": [provider.pk]},
            follow=True,
        )
    assert "payments: refresh queued." in [str(m) for m in response.context["messages"]]
    assert len(callbacks) == 1
    staff.post("/admin/tokens/provider/", {"action": "disable", "_selected_action": [provider.pk]})
    assert not Provider.objects.get(pk=provider.pk).enabled
    staff.post("/admin/tokens/provider/", {"action": "enable", "_selected_action": [provider.pk]})
    assert Provider.objects.get(pk=provider.pk).enabled


def provider_in_state(name: str, status: str) -> Provider:
    from datetime import timedelta

    from django.utils import timezone

    from tokens.models import ProviderState

    if status == "disabled":
        return make_provider(name, kind="static", secret="x", enabled=False)
    provider = make_provider(name, kind="callable", config={"path": "tests.callables.mapping"})
    if status in ("ok", "refreshing", "failing"):
        services.token_refresh(provider_id=provider.pk)
    if status == "failing":
        ProviderState.objects.filter(provider=provider).update(
            consecutive_failures=3, last_error="permanent: x"
        )
    if status == "expired":
        ProviderState.objects.filter(provider=provider).update(
            current_version=1,
            last_refresh_at=timezone.now() - timedelta(hours=1),
            expires_at=timezone.now() - timedelta(minutes=1),
            last_attempt_at=timezone.now(),
        )
    return provider


STATES = ["ok", "refreshing", "failing", "expired", "never", "disabled"]


def test_list__badge_and_filter_for_every_state(staff: Client) -> None:
    from tokens import store

    providers = {status: provider_in_state(f"p-{status}", status) for status in STATES}
    lock = store.refresh_lock(providers["refreshing"].pk)
    assert lock.acquire()
    try:
        page = staff.get("/admin/tokens/provider/").content.decode()
        for status in STATES:
            assert f"tokens-status-{status}" in page, status
        for status in STATES:
            response = staff.get(f"/admin/tokens/provider/?status={status}")
            names = [p.name for p in response.context["cl"].result_list]
            assert names == [f"p-{status}"], (status, names)
    finally:
        lock.release()


def test_change__refresh_now_button_queues_a_refresh(
    staff: Client, django_capture_on_commit_callbacks
) -> None:
    provider = make_provider("payments", kind="static", secret=SECRET)
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    assert 'id="tokens-refresh-now"' in staff.get(url).content.decode()
    with django_capture_on_commit_callbacks() as callbacks:
        response = staff.post(f"/admin/tokens/provider/{provider.pk}/refresh/", follow=True)
    assert response.redirect_chain[-1][0] == url
    assert "payments: refresh queued." in [str(m) for m in response.context["messages"]]
    assert len(callbacks) == 1
    assert (
        staff.get(f"/admin/tokens/provider/{provider.pk}/refresh/").status_code == 302
    )  # GET: no-op


def test_change__links_to_the_beat_schedule_and_flower(staff: Client, settings) -> None:
    settings.TOKENS_FLOWER_URL = "http://flower.example:5555"
    provider = make_provider("payments", kind="static", secret=SECRET)
    page = staff.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    task = PeriodicTask.objects.get(name="tokens.dispatch")
    assert f"/admin/django_celery_beat/periodictask/{task.pk}/change/" in page
    assert "next scheduled refresh" in page.lower()
    assert "http://flower.example:5555/tasks" in page
    task.enabled = False
    task.save()
    page = staff.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    assert "disabled: no scheduled refreshes" in page
    task.delete()
    page = staff.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    assert "manage.py sync_token_schedules" in page


def test_add__form_explains_each_kind(staff: Client) -> None:
    page = staff.get(ADD_URL).content.decode()
    for kind in ("oauth2_client_credentials", "callable", "static"):
        assert f"<b>{kind}</b>" in page
    assert "token_url" in page and "client_secret_post" in page
