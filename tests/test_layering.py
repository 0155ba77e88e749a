"""The code's layers, as `fmnist/__init__.py` states them: flows -> tasks -> fmnist, and nothing back;
inside `fmnist/`, each stage's package imports only the packages before it.

Read from the sources' import statements (module level and inside functions alike), so a new import
that breaks a layer fails here rather than in a review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# fmnist's packages, each allowed to import those to its left (and itself).
PACKAGES = ("storage", "data", "training", "evaluation", "registry", "serving", "ops")


def imported(path: Path) -> set[str]:
    """Every module `path` imports, top-level name first (`fmnist.data.cache`, `prefect.artifacts`, ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def stage(path: Path) -> str:
    """The stage package an fmnist module belongs to (a package inside it, like serving/protos, is its stage's)."""
    return path.relative_to(ROOT / "fmnist").parts[0]


@pytest.mark.parametrize("path", modules("tasks"), ids=name)
def test_no_task_module_imports_another_or_a_flow(path: Path) -> None:
    crossing = {name for name in imported(path) if name.split(".")[0] in ("tasks", "flows")}
    assert not crossing, f"{path.name} imports {crossing}: records and plain functions belong in fmnist/"


@pytest.mark.parametrize("path", modules("fmnist"), ids=name)
def test_fmnist_imports_neither_tasks_nor_flows(path: Path) -> None:
    crossing = {name for name in imported(path) if name.split(".")[0] in ("tasks", "flows")}
    assert not crossing, f"{path.name} imports {crossing}"


def test_every_fmnist_module_is_in_a_stage_package() -> None:
    loose = [name(p) for p in modules("fmnist") if p.parent == ROOT / "fmnist" and p.name != "__init__.py"]
    assert not loose, f"{loose}: put each in the package of the stage it serves ({', '.join(PACKAGES)})"
    found = {stage(p) for p in modules("fmnist") if p.parent != ROOT / "fmnist"}
    assert found == set(PACKAGES), f"packages {sorted(found)}: add a new one to PACKAGES, in its layer"


@pytest.mark.parametrize("path", [p for p in modules("fmnist") if p.parent != ROOT / "fmnist"], ids=name)
def test_a_stage_package_imports_only_the_ones_before_it(path: Path) -> None:
    allowed = PACKAGES[: PACKAGES.index(stage(path)) + 1]
    above = {m for m in imported(path) if m.startswith("fmnist.") and m.split(".")[1] not in allowed}
    assert not above, f"{name(path)} imports {above}, a later stage's code; move what both need down"


@pytest.mark.parametrize("path", modules("flows"), ids=name)
def test_flows_are_wiring_without_hashing_or_file_formats(path: Path) -> None:
    work = {"hashlib", "json", "subprocess", "fmnist.storage", "fmnist.storage.files", "fmnist.registry.manifest"}
    work |= {"fmnist.training.lineage"}
    assert not imported(path) & work, f"{path.name} does work a stage should do: {imported(path) & work}"


# Where a location's scheme may be looked at: the store that picks a backend, and the backends. A
# mirror is no storage location, so the download stage tells http(s) mirrors from the store's own.
SCHEME_AWARE = {"fmnist/storage/store.py", "fmnist/storage/local.py", "fmnist/storage/s3.py", "fmnist/data/download.py"}
SCHEME_TEST = re.compile(r"is_remote|\.scheme\b|startswith\(\s*[\"'](s3|file|gs|az)|[\"'](s3|file)://[\"']\s*(in|==)")


@pytest.mark.parametrize("path", [*modules("fmnist"), *modules("tasks"), *modules("flows")], ids=name)
def test_only_the_storage_backends_tell_one_kind_of_location_from_another(path: Path) -> None:
    if name(path) in SCHEME_AWARE:
        return
    found = [line.strip() for line in path.read_text().splitlines() if SCHEME_TEST.search(line)]
    assert not found, f"{name(path)} tests a location's scheme: {found}; ask the Store (e.g. direct_path) instead"


def test_the_scheme_check_sees_the_old_ways() -> None:
    for line in ("if is_remote(location):", "scheme = urlsplit(x).scheme", 'location.startswith("s3://")'):
        assert SCHEME_TEST.search(line), line
