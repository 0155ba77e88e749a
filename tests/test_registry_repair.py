"""The registry has no dead ends, on disk and in a bucket: a lost audit-log entry is restored from what the
registry still holds (with the operator's acknowledgement where the evidence cannot settle it), a deleted log
is never an empty registry, a version folder no registration made counts for nothing, and a damaged
labels.json is cleared by the `--clear` its error names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmnist.ops import cli
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import Store, join
from tests.test_registry import register


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    return Registry(store, root + "/registry")


def entry(registry: Registry, sequence: int) -> str:
    return join(registry.log_root, f"{sequence:08d}.json")


def fields(record: dict) -> tuple:
    return tuple(record.get(k) for k in ("sequence", "event", "version", "replaced", "model_sha256"))


def cli_args(registry: Registry, tmp_path: Path) -> list[str]:
    return ["--registry", registry.root, "--scratch", str(tmp_path / "scratch")]


def test_lost_audit_log_entries_are_restored_from_the_registry_and_the_repair_is_logged(
    registry: Registry, tmp_path: Path, capsys
) -> None:
    """One lost entry stopped every registration, promotion, rollback and label, and `repair-champion` too,
    with only "restore from a backup" as advice."""
    for accuracy in (0.85, 0.86, 0.87):
        register(registry, accuracy)
    registry.rollback()  # change 4: v0002
    registry.promote("v0003", "back")  # change 5
    registry.rollback()  # change 6: v0002
    original = {e["sequence"]: fields(e) for e in registry.promotions()}
    for sequence in (2, 4):  # a promotion and a rollback, lost (a lifecycle rule, a partial restore)
        registry.store.delete(entry(registry, sequence))
    with pytest.raises(RegistryError, match=r"misses change 2 \(2 missing in all\).*fashion-mnist repair-log"):
        register(registry, 0.9)
    assert cli.main([*cli_args(registry, tmp_path), "rollback"]) == 1
    assert "fashion-mnist repair-log" in capsys.readouterr().err

    assert cli.main([*cli_args(registry, tmp_path), "repair-log"]) == 0
    assert "2 entries restored" in capsys.readouterr().out
    restored = registry.promotions()
    assert {e["sequence"]: fields(e) for e in restored} == original
    for sequence in (2, 4):  # the repair is in the log itself
        repair = restored[sequence - 1]["repair"]
        assert repair["by"] == "fashion-mnist repair-log" and repair["acknowledged"] is False
        assert "only history that fits" in repair["evidence"]
    assert "repair" not in restored[0]
    assert registry.rollback() == "v0001"  # the chain of earlier champions is intact
    assert register(registry, 0.9).promoted
    assert cli.main([*cli_args(registry, tmp_path), "promotions"]) == 0
    assert "[restored by repair-log at" in capsys.readouterr().out
    with pytest.raises(RegistryError, match=r"the audit log is whole .*nothing to repair"):
        registry.repair_log()


def test_a_log_deleted_beside_its_pointer_is_rebuilt_from_the_pointer(registry: Registry) -> None:
    for accuracy in (0.85, 0.86, 0.87):
        register(registry, accuracy)
    original = [fields(e) for e in registry.promotions()]
    registry.store.delete(registry.log_root)
    with pytest.raises(RegistryError, match=r"ends at change 0.*fashion-mnist repair-log"):
        register(registry, 0.9)
    with pytest.raises(RegistryError, match="fashion-mnist repair-log"):
        registry.repair_champion()
    assert [e["sequence"] for e in registry.repair_log()] == [1, 2, 3]
    assert [fields(e) for e in registry.promotions()] == original
    assert registry.champion() == "v0003" and registry.champion_record()["previous"] == ["v0001", "v0002"]


def test_a_gap_the_evidence_cannot_settle_is_written_only_with_the_operators_acknowledgement(
    registry: Registry, tmp_path: Path, capsys
) -> None:
    for accuracy in (0.85, 0.86, 0.87, 0.88, 0.89):
        register(registry, accuracy)
    registry.store.delete(registry.champion_file)
    for sequence in (3, 4):  # change 3 was v0003's promotion, or a rollback to v0001: nothing says which
        registry.store.delete(entry(registry, sequence))
    before = registry.store.find(registry.log_root)
    assert cli.main([*cli_args(registry, tmp_path), "repair-log"]) == 1
    err = capsys.readouterr().err
    assert "changes 3, 4 cannot be restored" in err and "repair-log --acknowledge-lost" in err
    assert registry.store.find(registry.log_root) == before  # nothing written unacknowledged

    assert cli.main([*cli_args(registry, tmp_path), "repair-log", "--acknowledge-lost"]) == 0
    entries = registry.promotions()
    assert [(e["sequence"], e["event"], e["version"], e["replaced"]) for e in entries[2:4]] == [
        (3, "lost", None, "v0002"),
        (4, "lost", "v0004", None),
    ]
    assert all(e["repair"]["acknowledged"] for e in entries[2:4])
    assert registry.repair_champion()["version"] == "v0005"
    assert registry.champion_record()["previous"] == ["v0004"]  # what came before a lost change is unknown
    assert cli.main([*cli_args(registry, tmp_path), "promotions"]) == 0
    assert "lost     ?" in capsys.readouterr().out
    assert not register(registry, 0.86).promoted  # gated against v0005 and v0004, not a first version


def test_a_deleted_log_and_pointer_are_not_an_empty_registry(registry: Registry, tmp_path: Path, capsys) -> None:
    """Deleting the log (the obvious way out of a lost entry) brought back a "first version": 0.81 promoted
    over a 0.93 champion."""
    register(registry, 0.93)
    register(registry, 0.935)  # its claim saw champion v0001
    registry.store.delete(registry.log_root)
    registry.store.delete(registry.champion_file)
    with pytest.raises(RegistryError, match=r"are both missing, but the registry had a champion.*acknowledge-lost"):
        register(registry, 0.81)
    assert registry.versions() == ["v0001", "v0002"]
    with pytest.raises(RegistryError, match="repair-log --acknowledge-lost"):
        registry.promote("v0002", "by hand")
    assert cli.main([*cli_args(registry, tmp_path), "repair-log"]) == 1
    assert "--acknowledge-lost" in capsys.readouterr().err
    assert [e["event"] for e in registry.repair_log(acknowledge_lost=True)] == ["lost"]
    with pytest.raises(RegistryError, match="promote VERSION"):
        registry.repair_champion()
    registry.promote("v0002", "named by the operator after the log was lost")
    assert [e["sequence"] for e in registry.promotions()] == [1, 2]
    assert not register(registry, 0.81).promoted and registry.champion() == "v0002"


def copy_version(registry: Registry, source: str, target: str, names_itself: bool = False) -> None:
    """A version folder copied in by hand, claim.json and all; its manifest names `source`, or is edited."""
    folder = registry.version_dir(source)
    for name in registry.store.find(folder):
        data = registry.store.read_bytes(join(folder, name))
        if name == "manifest.json" and names_itself:
            data = json.dumps({**json.loads(data), "version": target}).encode()
        registry.store.write_bytes(join(registry.versions_root, target, name), data)


@pytest.mark.parametrize("names_itself", [False, True])
def test_a_version_folder_no_registration_made_is_refused_for_label_promote_serve_and_export(
    registry: Registry, tmp_path: Path, capsys, names_itself: bool
) -> None:
    register(registry, 0.85)
    register(registry, 0.80)
    copy_version(registry, "v0002", "v0005", names_itself)
    why = "no claim of v0005" if names_itself else "its manifest names 'v0002', not 'v0005'"
    refused = rf"v0005 is not a registered version: {why}"
    args = cli_args(registry, tmp_path)
    assert cli.main([*args, "label", "canary", "v0005"]) == 1
    assert "v0005 is not a registered version" in capsys.readouterr().err
    with pytest.raises(RegistryError, match=refused):
        Labels(registry).set("canary", "v0005", "copied")
    with pytest.raises(RegistryError, match=refused):
        registry.promote("v0005", "copied")
    out = tmp_path / "export"
    assert cli.main([*args, "export", "v0005", "--out", str(out)]) == 1
    assert "not a registered version" in capsys.readouterr().err and not out.exists()
    model = registry.manifest("v0002").files["model.keras"]
    with pytest.raises(RegistryError, match=refused):  # what the server loads a label's or the champion's model by
        registry.champion_model({"version": "v0005", "model_sha256": model})
    assert registry.champion() == "v0001" and Labels(registry).records() == {}
    assert cli.main([*args, "versions"]) == 0  # listed as what it is; the registered versions still list
    listed = capsys.readouterr().out
    assert "v0005    not a registered version" in listed and "* v0001" in listed
    assert register(registry, 0.86).version == "v0006"  # a registration passes it by


@pytest.mark.training
def test_the_server_never_serves_a_version_folder_no_registration_made(registry: Registry) -> None:
    from fmnist.serving.models import ServedModels

    register(registry, 0.85)
    copy_version(registry, "v0001", "v0005")
    model = registry.manifest("v0001").files["model.keras"]
    record = {"version": "v0005", "model_sha256": model, "at": "now", "reason": "by hand"}
    registry.store.write_bytes(join(registry.root, "labels.json"), json.dumps({"canary": record}).encode())
    served = ServedModels(registry, poll_s=1.0)
    served.refresh()
    assert "canary" not in served.by_label and "not a registered version" in served.problems["canary"]


def test_a_damaged_labels_file_is_cleared_by_clear_and_never_overwritten_by_set(
    registry: Registry, tmp_path: Path, capsys
) -> None:
    """`--clear`, which the error recommended, was refused on a damaged file; setting another label
    "repaired" it by dropping every label it held."""
    register(registry, 0.85)
    register(registry, 0.86)
    labels = Labels(registry)
    labels.set("canary", "v0001", "try")
    canary = labels.records()["canary"]
    damaged = json.dumps({"canary": canary, "shadow": {"version": "v00"}, "../x": {}}).encode()
    registry.store.write_bytes(labels.file, damaged)
    args = cli_args(registry, tmp_path)
    assert cli.main([*args, "label", "blue", "v0002"]) == 1
    err = capsys.readouterr().err
    assert "labels.json is damaged (label 'shadow' names no version; '../x' is not a label name)" in err
    assert "`fashion-mnist label NAME --clear`" in err and "keeping canary" in err
    assert registry.store.read_bytes(labels.file) == damaged  # nothing dropped

    assert cli.main([*args, "label", "shadow", "--clear"]) == 0
    out = capsys.readouterr().out
    assert "removed what could not be read: label 'shadow' names no version; '../x' is not a label name" in out
    assert labels.records() == {"canary": canary}  # the readable label is kept

    registry.store.write_bytes(labels.file, b'{"canary": {"vers')  # torn
    with pytest.raises(RegistryError, match="no label in it can be read"):
        labels.set("canary", "v0002", "again")
    assert cli.main([*args, "label", "canary", "--clear"]) == 0
    assert labels.records() == {}
    labels.set("canary", "v0002", "again")
    assert labels.records()["canary"]["version"] == "v0002"
