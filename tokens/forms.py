from __future__ import annotations

import json
from typing import Any

from django import forms
from django.utils.html import format_html, format_html_join

from tokens.generators import get_generator, registry
from tokens.models import Provider, refresh_lead, secret_destination


def kinds_help() -> str:
    """Which keys each kind takes, with an example (admin renders help text as HTML)."""
    items = format_html_join(
        "",
        "<li><b>{}</b>: {} Example: <code>{}</code></li>",
        (
            (kind, generator.help_text, json.dumps(generator.example_config))
            for kind, generator in registry().items()
        ),
    )
    return format_html("A JSON object; its keys depend on the kind:<ul>{}</ul>", items)


def interval_help(provider: Provider) -> str:
    """The interval in the terms the schedule uses it, and a warning when it is longer than
    the last token lived."""
    text = (
        "How often the schedule refreshes the token, e.g. 00:05:00; or earlier: a token that "
        "expires is always refreshed before it stops being handed out, whichever comes first."
    )
    lifetime = provider.last_token_lifetime() if provider.pk else None
    # (Measured from when it was stored: a token as long as the interval is no warning.)
    if lifetime is not None and lifetime * 1.05 < provider.refresh_interval:
        text += format_html(
            " <strong>Note: the last token lived {} s, less than this interval: it is refreshed "
            "every {} s or so, before each token expires.</strong>",
            f"{round(lifetime.total_seconds(), 1):g}",
            f"{round((lifetime - refresh_lead(lifetime)).total_seconds(), 1):g}",
        )
    return text


class ProviderForm(forms.ModelForm):
    """The secret is write-only: never rendered back. Left blank, the stored one is kept, but
    only while it would go where it went before (same name, same kind, same token endpoint
    origin, same trusted CAs): pointing a provider somewhere else requires the secret again."""

    secret = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text=(
            "The client secret; or, as the kind and auth_method say, a PEM private key (and "
            "certificate), a service-account JSON key, or the token itself (static). Never "
            "shown; leave blank to keep it, unless the kind or the token endpoint changes."
        ),
    )

    refresh_token = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "off"}),
        help_text=(
            "oauth2_refresh_token only: stored by Connect (the button above, once saved), or "
            "paste one here. Never shown; leave blank to keep it."
        ),
    )
    # Set by the admin from the request: the callback address to register at the IdP.
    redirect_uri = ""

    class Meta:
        model = Provider
        fields = [
            "name",
            "kind",
            "enabled",
            "config",
            "secret",
            "refresh_token",
            "refresh_interval",
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._secret_kept = False
        self._refresh_token_kept = False
        if "refresh_token" in self.fields:
            field = self.fields["refresh_token"]
            stored = "A refresh token is stored. " if self.instance.refresh_token else ""
            register = (
                f" Redirect URI to register at the identity provider: {self.redirect_uri}"
                if self.redirect_uri
                else ""
            )
            field.help_text = f"{stored}{field.help_text}{register}"
        # A view-only page has a form without fields.
        if "config" in self.fields:
            self.fields["config"].help_text = kinds_help()
        if "refresh_interval" in self.fields:
            self.fields["refresh_interval"].help_text = interval_help(self.instance)
        if "secret" in self.fields and self.instance.pk and self.instance.secret:
            self.fields["secret"].help_text = "A secret is stored. " + (
                self.fields["secret"].help_text or ""
            )

    def clean_secret(self) -> str:
        secret: str = self.cleaned_data.get("secret") or ""
        if not secret and self.instance.pk:
            self._secret_kept = True
            return self.instance.secret  # keep
        return secret

    def clean_refresh_token(self) -> str:
        value: str = self.cleaned_data.get("refresh_token") or ""
        if not value and self.instance.pk:
            self._refresh_token_kept = True
            return self.instance.refresh_token  # keep (a save never writes it back stale)
        return value

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        kind = cleaned.get("kind")
        if self._refresh_token_kept and kind in registry():
            if not get_generator(kind).uses_refresh_token:
                cleaned["refresh_token"] = ""  # a kind without one: the stored one goes
            elif self.instance.refresh_token and "config" in cleaned:
                stored = Provider.objects.filter(pk=self.instance.pk).first()
                # Where the refresh token goes: the kind, the endpoint's origin, the CAs.
                after = secret_destination(kind, cleaned["config"])
                if stored is not None and stored.secret_destination()[:3] != after[:3]:  # type: ignore[index]
                    self.add_error(
                        "refresh_token",
                        "Connect again (or paste a refresh token): the token endpoint or "
                        "the trusted CAs changed, and a refresh token is only ever sent "
                        "where it was issued for.",
                    )
        if self._secret_kept and {"name", "kind", "config"} <= set(cleaned):
            stored = Provider.objects.filter(pk=self.instance.pk).first()
            # The name is where the application sends the tokens (get_token(name)); the kind
            # and config are where the generator sends the secret.
            before = (stored.name, stored.secret_destination()) if stored else None
            after = (cleaned["name"], secret_destination(cleaned["kind"], cleaned["config"]))
            if stored is not None and before != after:
                self.add_error(
                    "secret",
                    "Enter the secret again: the name, the kind, the token endpoint's origin "
                    "or the trusted CAs changed, and a stored secret is only ever used where "
                    "it was entered for.",
                )
        return cleaned
