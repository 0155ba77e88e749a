"""The conftest guard that keeps TensorFlow out of the tiers that do not train (tests/tiers.py), on a
stand-in package: the guard is on while these tests run, and TensorFlow itself is what it refuses."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from tests.tiers import HeavyImports


@pytest.fixture
def heavy_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HeavyImports:
    (tmp_path / "stand_in_heavy").mkdir()
    (tmp_path / "stand_in_heavy" / "__init__.py").write_text("")
    (tmp_path / "stand_in_heavy" / "layers.py").write_text("DENSE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    guard = HeavyImports(heavy=("stand_in_heavy",))
    sys.meta_path.insert(0, guard)
    yield guard
    sys.meta_path.remove(guard)
    for name in [name for name in sys.modules if name.startswith("stand_in_heavy")]:
        del sys.modules[name]


def test_an_import_while_watched_is_refused_and_noted_even_if_caught(heavy_package: HeavyImports) -> None:
    heavy_package.watch()
    with pytest.raises(ImportError, match="outside the tiers that may train"):
        importlib.import_module("stand_in_heavy.layers")
    assert heavy_package.stop() == ["stand_in_heavy"]
    assert importlib.import_module("stand_in_heavy.layers").DENSE == 1  # unwatched, it imports


def test_a_package_loaded_before_is_hidden_while_watched_and_back_after(heavy_package: HeavyImports) -> None:
    loaded = importlib.import_module("stand_in_heavy.layers")
    heavy_package.watch()
    assert "stand_in_heavy.layers" not in sys.modules
    with pytest.raises(ImportError):
        import stand_in_heavy.layers  # noqa: F401
    assert heavy_package.stop() == ["stand_in_heavy"]
    assert sys.modules["stand_in_heavy.layers"] is loaded


def test_other_imports_pass_while_watched(heavy_package: HeavyImports) -> None:
    heavy_package.watch()
    importlib.import_module("json")
    assert heavy_package.stop() == []
