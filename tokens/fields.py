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
