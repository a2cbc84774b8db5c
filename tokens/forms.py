from __future__ import annotations

import json
from typing import Any

from django import forms
from django.utils.html import format_html, format_html_join

from tokens.generators import registry
from tokens.models import Provider


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


class ProviderForm(forms.ModelForm):
    """The secret is write-only: never rendered back; blank keeps the stored one."""

    secret = forms.CharField(
        required=False,
        strip=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Client secret (static: the token). Never shown; leave blank to keep it.",
    )

    class Meta:
        model = Provider
        fields = ["name", "kind", "enabled", "config", "secret", "refresh_interval"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["config"].help_text = kinds_help()
        if self.instance.pk and self.instance.secret:
            self.fields["secret"].help_text = "A secret is stored. " + (
                self.fields["secret"].help_text or ""
            )

    def clean_secret(self) -> str:
        secret: str = self.cleaned_data.get("secret") or ""
        if not secret and self.instance.pk:
            return self.instance.secret  # keep
        return secret
