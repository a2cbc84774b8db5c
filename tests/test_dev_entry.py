"""dev.py decides whether the virtualenv has what a command needs (it runs on a bare Python)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("dev_entry", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "VENV", tmp_path)
    return module


def satisfied(dev: ModuleType, extra: str) -> bool:
    stamps, _ = dev.install_stamps("abc", extra)
    return any(stamp.exists() for stamp in stamps)


def test_install_stamps__test_after_run_installs_the_dev_packages(dev: ModuleType) -> None:
    """The README's order: `run` (runtime packages only), then `test` (needs pytest)."""
    _, installed = dev.install_stamps("abc", "")  # what `run` leaves
    installed.touch()
    assert satisfied(dev, "")
    assert not satisfied(dev, "dev")  # `test` must install the dev extra


def test_install_stamps__run_after_test_installs_nothing_more(dev: ModuleType) -> None:
    _, installed = dev.install_stamps("abc", "dev")
    installed.touch()
    assert satisfied(dev, "dev") and satisfied(dev, "")
