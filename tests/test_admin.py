"""Operators manage providers in Django admin."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django_celery_beat.models import PeriodicTask

from tests.factories import SECRET, make_provider
from tokens import services
from tokens.models import Provider

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
    assert PeriodicTask.objects.get(name="tokens.refresh:payments").enabled


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
    assert not PeriodicTask.objects.filter(name__startswith="tokens.refresh:").exists()


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
    assert not PeriodicTask.objects.get(name="tokens.refresh:payments").enabled
    staff.post("/admin/tokens/provider/", {"action": "enable", "_selected_action": [provider.pk]})
    assert Provider.objects.get(pk=provider.pk).enabled
