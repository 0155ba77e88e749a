"""What the CLI shows and writes of a registry's version, as plain calls: its status (fmnist/registry/status.py)
and its SavedModel in TF Serving's layout (fmnist/registry/export.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fmnist.registry.export import export_for_tf_serving
from fmnist.registry.gate import decide
from fmnist.registry.status import version_status
from fmnist.registry.versions import Registry
from fmnist.storage import Store, StoredFile, join
from tests.helpers import GATE, run_manifest

PASSED = decide(0.85, "test-set-a", None, GATE)
KEPT_BACK = decide(0.75, "test-set-a", None, GATE)


def test_a_version_is_kept_back_promoted_or_never_champion() -> None:
    assert version_status("v0002", KEPT_BACK, "v0002", {"v0002"}) == f"kept back: {KEPT_BACK.reason}"
    assert version_status("v0001", PASSED, "v0001", set()) == f"promoted: {PASSED.reason}"  # the champion
    assert version_status("v0001", PASSED, "v0003", {"v0001"}) == f"promoted: {PASSED.reason}"  # an earlier one
    never = version_status("v0004", PASSED, "v0003", {"v0001", "v0003"})
    assert never == f"passed the gate, never champion: {PASSED.reason}"


def registered_with_export(tmp_path: Path) -> Registry:
    """A registry whose v0001 holds a SavedModel's files (stand-ins: export copies them, never loads them)."""
    registry = Registry(Store(scratch=tmp_path / "scratch"), str(tmp_path / "registry"))
    run = tmp_path / "run"
    files = {}
    for name, data in {"model.keras": b"model", "saved_model/1/saved_model.pb": b"graph"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
        files[name] = StoredFile(join(str(run), name), hashlib.sha256(data).hexdigest())
    files["saved_model/1/variables/variables.index"] = files["saved_model/1/saved_model.pb"]
    registry.register(files, run_manifest(0.9), GATE)
    return registry


def test_export_writes_the_version_s_saved_model_as_its_number_replacing_what_was_there(tmp_path: Path) -> None:
    registry = registered_with_export(tmp_path)
    base = tmp_path / "models"
    (base / "1").mkdir(parents=True)
    (base / "1" / "stale.pb").write_bytes(b"an earlier export")
    (base / ".1.partial").mkdir()  # an export that stopped half-way
    out = export_for_tf_serving(registry, "v0001", base)
    assert out == base / "1"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "saved_model.pb",
        "variables/variables.index",
    ]
    assert (out / "saved_model.pb").read_bytes() == b"graph" and sorted(p.name for p in base.iterdir()) == ["1"]
