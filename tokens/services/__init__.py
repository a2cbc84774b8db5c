"""The writes, by sub-domain: ``providers`` (what saving or deleting one means), ``refresh``,
``schedule``, ``invalidation``, ``keys``, and below them ``attempts`` (calling generators within
bounds), ``failures`` (recording one, the retry policy) and ``versions`` (fences and the stored
tokens). Each module imports only those below it (pyproject.toml's import-linter contract)."""
