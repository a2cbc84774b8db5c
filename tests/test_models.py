from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction

from tests.factories import SECRET, make_provider
from tokens import crypto
from tokens.exceptions import DecryptionError
from tokens.generators import Generator, kind_choices, registry
from tokens.models import Provider, Token
from tokens.services import refresh

pytestmark = pytest.mark.django_db


def valid(**overrides: object) -> Provider:
    fields: dict[str, object] = {
        "name": "api",
        "kind": "oauth2_client_credentials",
        "config": {"token_url": "https://auth.example.com/token", "client_id": "c"},
        "secret": SECRET,
        "refresh_interval": timedelta(minutes=5),
    }
    fields.update(overrides)
    return Provider(**fields)


def errors_of(provider: Provider) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as caught:
        provider.full_clean()
    return caught.value.message_dict


def test_full_clean__accepts_a_valid_provider() -> None:
    valid().full_clean()


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"kind": "smoke_signals"}, "kind", "not a valid choice"),
        ({"config": {"client_id": "c"}}, "config", "token_url: this key is required"),
        (
            {"config": {"token_url": "http://auth.example.com/t", "client_id": "c"}},
            "config",
            "https",
        ),
        (
            {"config": {"token_url": "https://a.example/t", "client_id": "c", "x": 1}},
            "config",
            "x: unknown key",
        ),
        ({"secret": ""}, "secret", "a secret is required"),
        ({"refresh_interval": timedelta(seconds=0)}, "refresh_interval", ""),
        ({"refresh_interval": timedelta(seconds=-5)}, "refresh_interval", ""),
        ({"name": "not a slug!"}, "name", "letters, numbers, underscores or hyphens"),
        ({"kind": "callable", "config": {"path": "nowhere.fn"}}, "config", "TOKENS_CALLABLES"),
    ],
)
def test_full_clean__field_level_errors(
    overrides: dict[str, object], field: str, fragment: str
) -> None:
    errors = errors_of(valid(**overrides))
    assert field in errors, errors
    assert any(fragment in message for message in errors[field]), errors


def test_full_clean__interval_below_the_minimum_setting(settings) -> None:
    settings.TOKENS_MIN_REFRESH_INTERVAL = 5
    errors = errors_of(valid(refresh_interval=timedelta(seconds=3)))
    assert "at least 5 seconds" in errors["refresh_interval"][0]


def test_full_clean__duplicate_name() -> None:
    make_provider("api", kind="static", secret="x")
    assert "name" in errors_of(valid(name="api"))


def test_database_refuses_an_interval_below_one_second() -> None:
    with pytest.raises(IntegrityError), transaction.atomic():
        make_provider("fast", kind="static", secret="x", interval=0.5)


def test_secret_is_encrypted_at_rest_and_decrypted_on_load() -> None:
    provider = make_provider("api", kind="static", secret=SECRET)
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM tokens_provider WHERE id = %s", [provider.pk])
        stored = cursor.fetchone()[0]
    assert SECRET not in stored
    assert crypto.decrypt(stored) == SECRET
    assert Provider.objects.get(pk=provider.pk).secret == SECRET


def test_wrong_key_gives_a_clear_error_not_garbage(settings) -> None:
    provider = make_provider("api", kind="static", secret=SECRET)
    settings.TOKENS_ENCRYPTION_KEYS = Fernet.generate_key().decode()
    with pytest.raises(DecryptionError) as caught:
        Provider.objects.get(pk=provider.pk)
    assert "cannot decrypt tokens_provider.secret with any key" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("keys", ["", [], "not-a-fernet-key"])
def test_missing_or_invalid_keys_refuse_to_start(settings, keys: object) -> None:
    settings.TOKENS_ENCRYPTION_KEYS = keys
    with pytest.raises(ImproperlyConfigured) as caught:
        crypto.check_keys()
    assert "TOKENS_ENCRYPTION_KEYS" in str(caught.value)


def test_app_refuses_to_start_without_keys() -> None:
    from tests.processes import run_script

    result = run_script("print('started')", TOKENS_ENCRYPTION_KEYS="")
    assert result.returncode != 0
    assert "TOKENS_ENCRYPTION_KEYS is not set" in result.stderr
    assert "started" not in result.stdout


def test_rotate_token_keys__reencrypts_with_the_new_key_and_loses_nothing(settings) -> None:
    old = settings.TOKENS_ENCRYPTION_KEYS
    provider = make_provider("api", kind="static", secret=SECRET)
    new = Fernet.generate_key().decode()
    settings.TOKENS_ENCRYPTION_KEYS = f"{new},{old}"
    out = StringIO()
    call_command("rotate_token_keys", stdout=out)
    assert "re-encrypted" in out.getvalue()
    # It names the key it encrypts with, by a fingerprint that reveals nothing of it.
    assert f"key #1 (fingerprint {crypto.key_fingerprint(new)})" in out.getvalue()
    assert not [
        key for key in [new, *crypto.tokens_settings.encryption_keys()] if key in out.getvalue()
    ]
    settings.TOKENS_ENCRYPTION_KEYS = new  # the old key is gone now
    assert Provider.objects.get(pk=provider.pk).secret == SECRET


def raw_column(table: str, column: str, pk: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {table} WHERE id = %s", [pk])
        return str(cursor.fetchone()[0])


def test_rotate_token_keys__refuses_when_a_row_does_not_open_and_rewrites_nothing(
    settings,
) -> None:
    provider = make_provider("api", kind="static", secret=SECRET)
    refresh.token_refresh(provider_id=provider.pk)
    token = Token.objects.get(provider=provider)
    foreign = Fernet(Fernet.generate_key()).encrypt(b"from another key").decode()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE tokens_token SET value = %s WHERE id = %s", [foreign, token.pk])
    secret_before = raw_column("tokens_provider", "secret", provider.pk)
    new = Fernet.generate_key().decode()
    settings.TOKENS_ENCRYPTION_KEYS = f"{new},{settings.TOKENS_ENCRYPTION_KEYS}"
    with pytest.raises(CommandError, match="nothing rewritten: 1 stored value") as caught:
        call_command("rotate_token_keys", stdout=StringIO())
    assert "token v1 of api" in str(caught.value)
    assert raw_column("tokens_provider", "secret", provider.pk) == secret_before


class Telepathy(Generator):
    kind = "telepathy"
    label = "Telepathy"


def test_project_can_add_kinds_through_the_setting(settings) -> None:
    settings.TOKENS_GENERATORS = {"telepathy": "tests.test_models.Telepathy"}
    assert isinstance(registry()["telepathy"], Telepathy)
    assert ("telepathy", "Telepathy") in kind_choices()
    valid(kind="telepathy", config={}, secret="").full_clean()


def test_models_match_migrations() -> None:
    out = StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()
