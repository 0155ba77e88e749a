"""The code's layers, as the README states them: flows -> tasks -> fmnist, and nothing back.

Read from the sources' import statements (module level and inside functions alike), so a new import
that breaks a layer fails here rather than in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    """Every module `path` imports, top-level name first (`fmnist.cache`, `prefect.artifacts`, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("path", modules("tasks"), ids=lambda p: p.name)
def test_no_task_module_imports_another_or_a_flow(path: Path) -> None:
    crossing = {name for name in imported(path) if name.split(".")[0] in ("tasks", "flows")}
    assert not crossing, f"{path.name} imports {crossing}: records and plain functions belong in fmnist/"


@pytest.mark.parametrize("path", modules("fmnist"), ids=lambda p: p.name)
def test_fmnist_imports_neither_tasks_nor_flows(path: Path) -> None:
    crossing = {name for name in imported(path) if name.split(".")[0] in ("tasks", "flows")}
    assert not crossing, f"{path.name} imports {crossing}"


@pytest.mark.parametrize("path", modules("flows"), ids=lambda p: p.name)
def test_flows_are_wiring_without_hashing_or_file_formats(path: Path) -> None:
    work = {"hashlib", "json", "subprocess", "fmnist.files", "fmnist.lineage", "fmnist.manifest", "fmnist.storage"}
    assert not imported(path) & work, f"{path.name} does work a stage should do: {imported(path) & work}"
