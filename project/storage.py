"""Static files storage of the example project."""

from __future__ import annotations

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticFilesStorage(CompressedManifestStaticFilesStorage):
    """Compressed, with hashed names cached for a year once ``collectstatic`` has run (its
    manifest); before that (the test suite, a fresh checkout) a file keeps its plain name
    rather than failing the page that links to it."""

    manifest_strict = False

    def stored_name(self, name: str) -> str:
        try:
            return str(super().stored_name(name))
        except ValueError:  # not collected: no manifest entry and no file to hash
            return name
