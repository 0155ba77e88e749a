"""The code's layers, as `fmnist/__init__.py` states them: flows -> tasks -> fmnist, and nothing back;
inside `fmnist/`, each stage's package imports only the packages before it.

Read from the sources' import statements (module level and inside functions alike), so a new import
that breaks a layer fails here rather than in a review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import ROOT

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


def test_no_task_module_imports_another_or_a_flow() -> None:
    offenders = {name(p): crossing for p in modules("tasks") if (crossing := imports_of(p, "tasks", "flows"))}
    assert not offenders, f"{offenders}: records and plain functions belong in fmnist/"


def test_fmnist_imports_neither_tasks_nor_flows() -> None:
    offenders = {name(p): crossing for p in modules("fmnist") if (crossing := imports_of(p, "tasks", "flows"))}
    assert not offenders, f"{offenders}: fmnist/ is below tasks/ and flows/"


def imports_of(path: Path, *tops: str) -> set[str]:
    return {module for module in imported(path) if module.split(".")[0] in tops}


def test_every_fmnist_module_is_in_a_stage_package() -> None:
    loose = [name(p) for p in modules("fmnist") if p.parent == ROOT / "fmnist" and p.name != "__init__.py"]
    assert not loose, f"{loose}: put each in the package of the stage it serves ({', '.join(PACKAGES)})"
    found = {stage(p) for p in modules("fmnist") if p.parent != ROOT / "fmnist"}
    assert found == set(PACKAGES), f"packages {sorted(found)}: add a new one to PACKAGES, in its layer"


def later_stages_imported(path: Path) -> set[str]:
    allowed = PACKAGES[: PACKAGES.index(stage(path)) + 1]
    return {m for m in imported(path) if m.startswith("fmnist.") and m.split(".")[1] not in allowed}


def test_a_stage_package_imports_only_the_ones_before_it() -> None:
    staged = [p for p in modules("fmnist") if p.parent != ROOT / "fmnist"]
    offenders = {name(p): above for p in staged if (above := later_stages_imported(p))}
    assert not offenders, f"{offenders}: each imports a later stage's code; move what both need down"


def test_flows_are_wiring_without_hashing_or_file_formats() -> None:
    work = {"hashlib", "json", "subprocess", "fmnist.storage", "fmnist.storage.files", "fmnist.registry.manifest"}
    work |= {"fmnist.training.lineage"}
    offenders = {name(p): found for p in modules("flows") if (found := imported(p) & work)}
    assert not offenders, f"{offenders}: work a stage should do"


def test_the_layer_checks_see_an_offender(tmp_path: Path) -> None:
    """The checks read what they are meant to: a module importing up and across is found by each reader."""
    module = tmp_path / "offender.py"
    module.write_text("import tasks.download\nfrom flows.retrain import retrain\ndef f():\n    import fmnist.ops.cli\n")
    assert imports_of(module, "tasks", "flows") == {"tasks.download", "flows.retrain"}
    assert "fmnist.ops.cli" in imported(module)


# Where a location's scheme may be looked at: the store that picks a backend, and the backends. A
# mirror is no storage location, so the download stage tells http(s) mirrors from the store's own.
# The storage backends, and the modules whose URLs are no storage location: a mirror's, a webhook's.
SCHEME_AWARE = {
    "fmnist/storage/store.py",
    "fmnist/storage/local.py",
    "fmnist/storage/s3.py",
    "fmnist/data/download.py",
    "fmnist/ops/automations.py",
}
SCHEME_TEST = re.compile(r"is_remote|\.scheme\b|startswith\(\s*[\"'](s3|file|gs|az)|[\"'](s3|file)://[\"']\s*(in|==)")


def test_only_the_storage_backends_tell_one_kind_of_location_from_another() -> None:
    offenders = {}
    for path in [*modules("fmnist"), *modules("tasks"), *modules("flows")]:
        found = [line.strip() for line in path.read_text().splitlines() if SCHEME_TEST.search(line)]
        if found and name(path) not in SCHEME_AWARE:
            offenders[name(path)] = found
    assert not offenders, f"{offenders}: each tests a location's scheme; ask the Store (e.g. direct_path) instead"


def test_the_scheme_check_sees_the_old_ways() -> None:
    for line in ("if is_remote(location):", "scheme = urlsplit(x).scheme", 'location.startswith("s3://")'):
        assert SCHEME_TEST.search(line), line
