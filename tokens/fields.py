from __future__ import annotations

from typing import Any

from django.db import models

from tokens import crypto


class EncryptedTextField(models.TextField):
    """Text stored as Fernet ciphertext; the model attribute holds the plaintext.

    Ciphertext is randomised, so the field cannot be filtered on by value.
    """

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if value is None or value == "":
            return value
        return crypto.decrypt(value, what=f"{self.model._meta.db_table}.{self.column}")

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return crypto.encrypt(str(value))


_UNSET = object()


class RotatingSecretField(EncryptedTextField):
    """An encrypted credential that the refresh service rotates behind the model's back (with
    UPDATEs): a refresh token. Saving a model instance writes it only when the caller set it
    since the row was read (``Model.from_db`` records what was read, as ``_loaded_<name>``);
    otherwise the UPDATE keeps whatever the database holds at that moment, so an instance read
    before a rotation (an admin form, a script) never writes the old credential back."""

    def pre_save(self, model_instance: models.Model, add: bool) -> Any:
        value = getattr(model_instance, self.attname)
        loaded = f"_loaded_{self.attname}"
        if not add and getattr(model_instance, loaded, _UNSET) == value:
            return models.F(self.attname)
        setattr(model_instance, loaded, value)
        return value
