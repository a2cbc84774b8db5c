"""Operators manage providers in Django admin."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django_celery_beat.models import PeriodicTask

from tests.factories import SECRET, make_provider
from tests.processes import broker_count, purge_queues
from tokens import locks
from tokens.constants import Reason
from tokens.generators import Generator
from tokens.models import Provider, ProviderState
from tokens.services import refresh

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
    refresh.token_refresh(provider_id=provider.pk)
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
    assert "Provider payments: refresh queued." in [str(m) for m in response.context["messages"]]
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
        refresh.token_refresh(provider_id=provider.pk)
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

    providers = {status: provider_in_state(f"p-{status}", status) for status in STATES}
    held = locks.locks_acquire([providers["refreshing"].pk])
    try:
        page = staff.get("/admin/tokens/provider/").content.decode()
        for status in STATES:
            assert f"tokens-status-{status}" in page, status
        for status in STATES:
            response = staff.get(f"/admin/tokens/provider/?status={status}")
            names = [p.name for p in response.context["cl"].result_list]
            assert names == [f"p-{status}"], (status, names)
    finally:
        locks.locks_release(held)


@pytest.mark.parametrize(
    ("query", "first", "last", "count"),
    [
        ("", "p-000", "p-099", 100),
        ("?p=3", "p-200", "p-249", 50),  # the last page
        ("?status=ok&p=2", "p-100", "p-200", 100),  # p-120 is refreshing, not ok
        ("?o=-1&p=3", "p-049", "p-000", 50),  # by name, descending
        ("?q=p-1", "p-100", "p-199", 100),
    ],
)
def test_list__any_page_costs_a_fixed_number_of_queries_and_one_redis_read(
    staff: Client,
    redis_client,
    django_assert_max_num_queries,
    query: str,
    first: str,
    last: str,
    count: int,
) -> None:
    """At 100,000 providers: a deep page reads its ids, then its rows (not every row before
    them), and the badges' "refreshing" is read once for the page, not once per row."""
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    providers = Provider.objects.bulk_create(
        [Provider(name=f"p-{i:03d}", kind="static", secret="x") for i in range(250)]
    )
    ProviderState.objects.bulk_create(
        [
            ProviderState(
                provider=p, current_version=1, last_refresh_at=now, expires_at=now + timedelta(1)
            )
            for p in providers
        ]
    )
    held = locks.locks_acquire([providers[120].pk])
    try:
        redis_client.config_resetstat()
        with django_assert_max_num_queries(7) as queries:
            response = staff.get(f"/admin/tokens/provider/{query}")
        stats = redis_client.info("commandstats")
    finally:
        locks.locks_release(held)
    names = [p.name for p in response.context["cl"].result_list]
    assert (names[0], names[-1], len(names)) == (first, last, count)
    # The page's badges: one read for 100 rows (and one for the status filter's refreshing).
    assert stats["cmdstat_mget"]["calls"] <= 2
    # One count, the list's (its pages need it): not the whole table again beside it.
    assert sum("COUNT(" in q["sql"] for q in queries.captured_queries) == 1
    # The query that slices the list (none when it fits on one page) reads only the ids.
    for sql in [q["sql"] for q in queries.captured_queries if "OFFSET" in q["sql"]]:
        columns = sql.split(" FROM ")[0]
        assert columns.startswith('SELECT "tokens_provider"."id"') and "," not in columns, sql
    page = response.content.decode()
    assert ("tokens-status-refreshing" in page) == ("p-120" in names and "status=ok" not in query)
    if query == "?p=3":  # the last page is read from the end: no row before it is walked
        assert not [q for q in queries.captured_queries if "OFFSET" in q["sql"]]


def test_change__refresh_now_button_queues_a_refresh(
    staff: Client, django_capture_on_commit_callbacks
) -> None:
    provider = make_provider("payments", kind="static", secret=SECRET)
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    assert 'id="tokens-refresh-now"' in staff.get(url).content.decode()
    with django_capture_on_commit_callbacks() as callbacks:
        response = staff.post(f"/admin/tokens/provider/{provider.pk}/refresh/", follow=True)
    assert response.redirect_chain[-1][0] == url
    assert "Provider payments: refresh queued." in [str(m) for m in response.context["messages"]]
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
    assert "next refresh" in page.lower()
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


# ---------------------------------------------------------------------------- permissions


def user_with(*codenames: str) -> User:
    from django.contrib.auth.models import Permission

    user = User.objects.create_user("limited", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return User.objects.get(pk=user.pk)


def secret_forms(secret: str) -> list[str]:
    import base64
    from urllib.parse import quote_plus

    return [secret, quote_plus(secret), base64.b64encode(secret.encode()).decode()]


def test_view_only__sees_the_pages_without_the_secret_and_can_change_nothing(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    """view_provider means view: no action is offered or runs, the change page answers 200
    read-only, and the secret appears in no form."""
    provider = make_provider("payments", kind="static", secret=SECRET)
    client.force_login(user_with("view_provider"))
    page = client.get("/admin/tokens/provider/")
    assert page.status_code == 200
    assert page.context["action_form"] is None or not [
        choice for choice, _ in page.context["action_form"].fields["action"].choices if choice
    ]
    for action in ("disable", "enable", "refresh_now"):
        with django_capture_on_commit_callbacks() as callbacks:
            client.post(
                "/admin/tokens/provider/", {"action": action, "_selected_action": [provider.pk]}
            )
        assert callbacks == []
    assert Provider.objects.get(pk=provider.pk).enabled
    change = client.get(f"/admin/tokens/provider/{provider.pk}/change/")
    assert change.status_code == 200
    html = change.content.decode()
    assert "stored (write-only: never shown)" in html
    assert 'id="tokens-refresh-now"' not in html
    # The status and the token history (fingerprints) are part of what view_provider shows.
    refresh.token_refresh(provider_id=provider.pk)
    html = client.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    assert "consecutive failures" in html.lower()
    assert Provider.objects.get(pk=provider.pk).tokens.get().fingerprint in html
    for form in secret_forms(SECRET):
        assert form not in html
    assert client.post(f"/admin/tokens/provider/{provider.pk}/refresh/").status_code == 403
    assert (
        client.post(
            f"/admin/tokens/provider/{provider.pk}/change/", form_data(kind="static", config="{}")
        ).status_code
        == 403
    )
    assert Provider.objects.get(pk=provider.pk).secret == SECRET


def test_refresh_permission__refreshes_but_edits_nothing(
    client: Client, django_capture_on_commit_callbacks
) -> None:
    provider = make_provider("payments", kind="static", secret=SECRET)
    client.force_login(user_with("view_provider", "refresh_provider"))
    choices = [
        c
        for c, _ in client.get("/admin/tokens/provider/")
        .context["action_form"]
        .fields["action"]
        .choices
        if c
    ]
    assert choices == ["refresh_now"]
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(f"/admin/tokens/provider/{provider.pk}/refresh/", follow=True)
    assert "Provider payments: refresh queued." in [str(m) for m in response.context["messages"]]
    assert len(callbacks) == 1
    client.post("/admin/tokens/provider/", {"action": "disable", "_selected_action": [provider.pk]})
    assert Provider.objects.get(pk=provider.pk).enabled
    html = client.get(f"/admin/tokens/provider/{provider.pk}/change/").content.decode()
    assert 'id="tokens-refresh-now"' in html and SECRET not in html


@pytest.mark.parametrize(
    ("change", "needs_secret"),
    [
        ({"token_url": "https://attacker.example/token"}, True),
        ({"token_url": "https://auth.example.com:8443/token"}, True),
        ({"token_url": "http://localhost/token"}, True),
        ({"ca_certs": "-----BEGIN CERTIFICATE-----"}, True),
        ({"token_url": "https://auth.example.com/other/path"}, False),
        ({"scope": "read"}, False),
    ],
)
def test_change__a_blank_secret_is_kept_only_while_it_goes_where_it_went(
    staff: Client, change: dict[str, str], needs_secret: bool
) -> None:
    """Write-only means bound to its destination: pointing a provider at another origin (or
    other CAs) with the secret left blank is refused, so the stored secret is never sent to a
    host of the editor's choosing."""
    config = {"token_url": "https://auth.example.com/token", "client_id": "c1"}
    provider = make_provider("payments", config=config)
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    new_config = {**config, **change}
    response = staff.post(url, form_data(config=json.dumps(new_config), secret=""))
    if needs_secret:
        assert response.status_code == 200
        errors = response.context["adminform"].form.errors
        assert any("Enter the secret again" in message for message in errors.get("secret", []))
        assert Provider.objects.get(pk=provider.pk).config == config
    else:  # same origin, same CAs: the stored secret is kept
        assert response.status_code == 302, response.context["adminform"].form.errors
        saved = Provider.objects.get(pk=provider.pk)
        assert (saved.config, saved.secret) == (new_config, SECRET)


def test_change__another_kind_needs_the_secret_again(staff: Client) -> None:
    provider = make_provider(
        "payments", config={"token_url": "https://auth.example.com/token", "client_id": "c1"}
    )
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    response = staff.post(url, form_data(kind="static", config="{}", secret=""))
    assert response.status_code == 200
    assert "secret" in response.context["adminform"].form.errors
    response = staff.post(url, form_data(kind="static", config="{}", secret="new-static-token"))
    assert response.status_code == 302
    assert Provider.objects.get(pk=provider.pk).secret == "new-static-token"


@pytest.mark.parametrize("interval", ["3650000 00:00:00", "366 00:00:00"])
def test_add__an_interval_beyond_the_cap_is_a_field_error_not_a_500(
    staff: Client, interval: str
) -> None:
    response = staff.post(ADD_URL, form_data(refresh_interval=interval))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert any("at most 365 days" in message for message in errors["refresh_interval"])
    assert not Provider.objects.exists()


class Webhook(Generator):
    """A project's own kind: it sends the secret to config["url"], and does not say so."""

    kind = "webhook"
    label = "Webhook"
    required_keys = frozenset({"url"})
    secret_required = True


def test_change__a_projects_own_kind_needs_the_secret_again_for_any_config_change(
    staff: Client, settings
) -> None:
    settings.TOKENS_GENERATORS = {"webhook": "tests.test_admin.Webhook"}
    provider = make_provider("hook", kind="webhook", config={"url": "https://a.example/t"})
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    moved = form_data(name="hook", kind="webhook", config='{"url": "https://evil.example/t"}')
    response = staff.post(url, {**moved, "secret": ""})
    assert response.status_code == 200
    assert "secret" in response.context["adminform"].form.errors
    assert Provider.objects.get(pk=provider.pk).config == {"url": "https://a.example/t"}


def test_change__a_rename_needs_the_secret_again_and_voids_the_tokens(
    staff: Client, django_capture_on_commit_callbacks
) -> None:
    """The name is where the application sends the tokens (get_token(name)): swapping names
    would send one API's tokens to another."""
    provider = make_provider("payments", kind="static", secret=SECRET)
    refresh.token_refresh(provider_id=provider.pk)
    version = ProviderState.objects.get(provider=provider).current_version
    url = f"/admin/tokens/provider/{provider.pk}/change/"
    renamed = form_data(name="partner", kind="static", config="{}")
    response = staff.post(url, {**renamed, "secret": ""})
    assert response.status_code == 200
    assert "secret" in response.context["adminform"].form.errors
    with django_capture_on_commit_callbacks(execute=False):
        assert staff.post(url, {**renamed, "secret": "typed-again"}).status_code == 302
    state = ProviderState.objects.get(provider=provider)
    assert state.current_version > version and not state.fingerprint  # the old token is void


def test_refresh_now__repeated_clicks_queue_one_refresh(
    staff: Client, django_capture_on_commit_callbacks
) -> None:
    provider = make_provider("payments", kind="static", secret=SECRET)
    with django_capture_on_commit_callbacks() as callbacks:
        for _ in range(5):
            response = staff.post(f"/admin/tokens/provider/{provider.pk}/refresh/", follow=True)
    assert len(callbacks) == 1
    assert "a refresh was queued moments ago" in str(list(response.context["messages"])[-1])


def test_refresh_now__of_a_failing_provider_goes_to_the_scheduled_lane(
    staff: Client, django_capture_on_commit_callbacks
) -> None:
    """Its endpoint may hang: somebody's "Refresh now" must not hold up the urgent lane."""
    healthy = make_provider("healthy", kind="static", secret=SECRET)
    failing = make_provider("failing", kind="static", secret=SECRET)
    ProviderState.objects.filter(provider=failing).update(consecutive_failures=2)
    purge_queues("tokens.urgent,tokens.scheduled")
    with django_capture_on_commit_callbacks(execute=True):
        for provider in (healthy, failing):
            staff.post(f"/admin/tokens/provider/{provider.pk}/refresh/")
    assert broker_count("tokens.urgent") == 1
    assert broker_count("tokens.scheduled") == 1


def test_status_view__what_the_open_pages_poll(staff: Client, client: Client) -> None:
    from tokens.services.refresh import token_refresh

    ok = make_provider("ok-one", kind="callable", config={"path": "tests.callables.mapping"})
    token_refresh(provider_id=ok.pk, reason=Reason.MANUAL)
    bad = make_provider("bad-one", config={"client_id": "c"})
    token_refresh(provider_id=bad.pk)
    body = staff.get(f"/admin/tokens/provider/status/?ids={ok.pk},{bad.pk},x").json()
    assert body["providers"][str(ok.pk)]["status"] == "ok"
    assert body["providers"][str(bad.pk)]["status"] == "failing"
    assert "invalid provider config" in body["providers"][str(bad.pk)]["last_error"]
    viewer = Client()
    viewer.force_login(user_with("view_provider"))
    assert viewer.get(f"/admin/tokens/provider/status/?ids={ok.pk}").status_code == 200
    nobody = Client()
    nobody.force_login(User.objects.create_user("nobody", password="pw", is_staff=True))
    assert nobody.get(f"/admin/tokens/provider/status/?ids={ok.pk}").status_code == 403


def test_pages__tidy(staff: Client) -> None:
    """The add page has no empty state blocks; no "View site" link to nowhere; messages keep
    the provider's name as get_token() takes it; the interval is explained and warned about."""
    from tokens.services.refresh import token_refresh

    add = staff.get("/admin/tokens/provider/add/").content.decode()
    assert "refresh_state-group" not in add and "tokens-group" not in add
    assert "field-status_badge" not in add and "field-next_refresh" not in add
    assert "View site" not in add
    short = make_provider(
        "short", kind="callable", config={"path": "tests.callables.short_lived"}, interval=300
    )
    token_refresh(provider_id=short.pk, reason=Reason.MANUAL)
    page = staff.get(f"/admin/tokens/provider/{short.pk}/change/").content.decode()
    assert "whichever comes first" in page
    assert "the last token lived 3 s, less than this interval" in page
    assert "Refresh state: refresh state" not in page
    response = staff.post(f"/admin/tokens/provider/{short.pk}/refresh/", follow=True)
    assert "Provider short: refresh queued." in [str(m) for m in response.context["messages"]]


def test_status_view__odd_ids_are_ignored_not_a_500(staff: Client) -> None:
    response = staff.get("/admin/tokens/provider/status/?ids=²,99999999999999999999999,1")
    assert response.status_code == 200 and response.json() == {"providers": {}}
