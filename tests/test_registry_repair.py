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
from fmnist.registry.log_repair import repair_champion, repair_log
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import IntegrityError, Store, join
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
        repair_log(registry)


def test_a_log_deleted_beside_its_pointer_is_rebuilt_from_the_pointer(registry: Registry) -> None:
    for accuracy in (0.85, 0.86, 0.87):
        register(registry, accuracy)
    original = [fields(e) for e in registry.promotions()]
    registry.store.delete(registry.log_root)
    with pytest.raises(RegistryError, match=r"ends at change 0.*fashion-mnist repair-log"):
        register(registry, 0.9)
    with pytest.raises(RegistryError, match="fashion-mnist repair-log"):
        repair_champion(registry)
    assert [e["sequence"] for e in repair_log(registry)] == [1, 2, 3]
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
    assert repair_champion(registry)["version"] == "v0005"
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
    assert [e["event"] for e in repair_log(registry, acknowledge_lost=True)] == ["lost"]
    with pytest.raises(RegistryError, match="promote VERSION"):
        repair_champion(registry)
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


def copy_folder(store: Store, source: str, target: str) -> None:
    for name in store.find(source):
        store.write_bytes(join(target, name), store.read_bytes(join(source, name)))


def test_a_version_counts_only_by_this_registrys_own_claim_of_it(registry: Registry, store: Store) -> None:
    """A folder copied in from another registry (its own claim.json naming the number) was promoted; a
    claim.json other than this registry's claim of the number was accepted."""
    for accuracy in (0.85, 0.86):
        register(registry, accuracy)
    registry._claim_version({"flow_run_id": "crashed"})  # v0003: claimed here, its run died before publishing
    other = Registry(store, registry.root.removesuffix("/registry") + "/other")
    for accuracy in (0.85, 0.86, 0.87, 0.88, 0.95):
        register(other, accuracy)
    for version in ("v0003", "v0005"):
        copy_folder(store, other.version_dir(version), join(registry.versions_root, version))
    with pytest.raises(RegistryError, match=r"v0005 is not a registered version: no claim of v0005 in this registry"):
        registry.promote("v0005", "copied in")
    with pytest.raises(RegistryError, match=r"v0003 is not a registered version: its claim.json is not this regis"):
        Labels(registry).set("canary", "v0003", "copied over a crashed claim")
    assert registry.champion() == "v0002" and Labels(registry).records() == {}
    assert register(registry, 0.87).version == "v0006"  # the copied numbers are still never issued


def test_versions_from_before_claims_still_count(registry: Registry, store: Store) -> None:
    """Registries from before `claims/` hold versions whose claim.json names no version (or that have none):
    they are registered; a folder of that form copied in above this registry's claims is not."""
    for accuracy in (0.85, 0.86):
        register(registry, accuracy)
    store.delete(registry.claims_root)
    old = json.dumps({"flow_run_id": "run", "claimed_at": "2025-01-01T00:00:00+00:00"}).encode()
    store.write_bytes(join(registry.versions_root, "v0001", "claim.json"), old)  # claim.json's first form
    store.delete(join(registry.versions_root, "v0002", "claim.json"))  # before claim files
    assert registry.manifest("v0001").version == "v0001" and registry.manifest("v0002").version == "v0002"
    assert register(registry, 0.87).promoted  # gated against v0002 and v0001, claimed as v0003 in claims/
    copy_folder(store, registry.version_dir("v0001"), join(registry.versions_root, "v0009"))
    record = json.loads(store.read_bytes(join(registry.versions_root, "v0009", "manifest.json")))
    store.write_bytes(
        join(registry.versions_root, "v0009", "manifest.json"), json.dumps({**record, "version": "v0009"}).encode()
    )
    with pytest.raises(RegistryError, match="v0009 is not a registered version: no claim of v0009"):
        registry.promote("v0009", "copied in")
    registry.rollback()
    assert registry.champion() == "v0002"


def test_a_change_numbered_beyond_any_the_registry_can_reach_is_named_as_stray(registry: Registry) -> None:
    """`promotions/99999999999.json`, or a claim's champion_sequence of 10**15, made repair-log build a list of
    that size (MemoryError)."""
    for accuracy in (0.85, 0.86, 0.87):
        register(registry, accuracy)
    stray = join(registry.log_root, "99999999999.json")
    registry.store.write_bytes(stray, b"{}")
    for action in (registry.promotions, lambda: repair_log(registry)):
        with pytest.raises(RegistryError, match=r"99999999999.json: change 99999999999 is beyond.*a stray file.*move"):
            action()
    registry.store.delete(stray)
    claim = join(registry.claims_root, "v0004.json")
    registry.store.write_bytes(
        claim, json.dumps({"version": "v0004", "champion": "v0003", "champion_sequence": 10**15}).encode()
    )
    registry.store.write_bytes(entry(registry, 2), b'{"sequence": 2, "ev')  # torn: repair-log is needed
    with pytest.raises(RegistryError, match=r"v0004.json: its champion_sequence 1000000000000000 is beyond.*stray"):
        repair_log(registry)
    registry.store.delete(claim)
    assert [e["version"] for e in repair_log(registry)] == ["v0002"]
    pointer = {**registry.champion_record(), "sequence": 10**15}
    registry.store.write_bytes(registry.champion_file, json.dumps(pointer).encode())
    with pytest.raises(RegistryError, match=r"change 1000000000000000, beyond any.*repair-champion"):
        registry.champion()
    with pytest.raises(RegistryError, match="the audit log is whole"):
        repair_log(registry)  # an edited pointer is no evidence of lost changes
    assert repair_champion(registry)["sequence"] == 3


def test_promote_never_overwrites_a_pointer_ahead_of_the_log(registry: Registry, tmp_path: Path, capsys) -> None:
    """With the log's last two entries lost, `promote` rewrote the pointer (change 5) as change 4 and logged a
    false entry; repair-log then called the log whole."""
    for accuracy in (0.85, 0.86, 0.87, 0.88, 0.89):
        register(registry, accuracy)
    for sequence in (4, 5):
        registry.store.delete(entry(registry, sequence))
    pointer = registry.store.read_bytes(registry.champion_file)
    for args in (["promote", "v0002"], ["rollback"]):
        assert cli.main([*cli_args(registry, tmp_path), *args]) == 1
        assert "fashion-mnist repair-log" in capsys.readouterr().err
    assert registry.store.read_bytes(registry.champion_file) == pointer
    assert [e["version"] for e in repair_log(registry)] == ["v0004", "v0005"]
    registry.promote("v0002", "after the repair")
    assert [e["version"] for e in registry.promotions()] == ["v0001", "v0002", "v0003", "v0004", "v0005", "v0002"]


DEEP = b"[" * 200_000 + b"]" * 200_000


def test_json_nested_too_deeply_is_damage_in_every_registry_file(registry: Registry, store: Store) -> None:
    """200,000 '[' gave a RecursionError traceback from each file the registry reads, and from the commands
    its errors advised."""
    for accuracy in (0.85, 0.86, 0.87):
        register(registry, accuracy)
    labels = Labels(registry)
    damage = {
        labels.file: (
            lambda: labels.set("canary", "v0002", "x"),
            r"labels.json is damaged \(not valid JSON \(nested too deeply",
        ),
        registry.champion_file: (registry.rollback, r"champion pointer is damaged \(not valid JSON \(nested"),
        entry(registry, 2): (registry.promotions, r"00000002.json: a damaged audit log entry"),
        join(registry.versions_root, "v0002", "manifest.json"): (
            lambda: registry.promote("v0002", "x"),
            r"manifest.json: not valid JSON \(nested too deeply\); the version's manifest is damaged",
        ),
        join(registry.versions_root, "v0002", "claim.json"): (
            lambda: registry.promote("v0002", "x"),
            "v0002 is not a registered version: its claim.json is not",
        ),
    }
    for location, (action, refusal) in damage.items():
        kept = store.read_versioned(location)
        store.write_bytes(location, DEEP)
        with pytest.raises(RegistryError, match=refusal):
            action()
        if location == labels.file:
            assert labels.clear("canary") == ["not valid JSON (nested too deeply)"]
        elif kept:
            store.write_bytes(location, kept[0])
    store.write_bytes(entry(registry, 3), DEEP)
    with pytest.raises(IntegrityError, match=r"00000003.json: not valid JSON \(nested too deeply\)"):
        store.read_json(entry(registry, 3))
    store.write_bytes(join(registry.claims_root, "v0004.json"), DEEP)  # the newest claim: repair-log's evidence
    assert [e["version"] for e in repair_log(registry)] == ["v0003"]


@pytest.mark.parametrize("which", ["champion", "labels", "entry"])
def test_a_folder_where_a_registry_file_belongs_is_named_with_the_way_out(registry: Registry, which: str) -> None:
    """A folder in the place of champion.json, labels.json or an audit log entry read as a missing file, and
    every way out ended in "already exists", "still changing after 50 attempts" or "no label"."""
    for accuracy in (0.85, 0.86):
        register(registry, accuracy)
    labels = Labels(registry)
    location = {"champion": registry.champion_file, "labels": labels.file, "entry": entry(registry, 2)}[which]
    if registry.store.exists(location):
        registry.store.delete(location)
    registry.store.write_bytes(join(location, "note.txt"), b"a folder")
    refusal = rf"{location} is a folder where the registry keeps a file: rename it out of the way"
    actions = {
        "champion": [registry.rollback, lambda: repair_champion(registry), lambda: registry.promote("v0001", "x")],
        "labels": [lambda: labels.set("canary", "v0001", "x"), lambda: labels.clear("canary")],
        "entry": [
            registry.promotions,
            lambda: repair_log(registry),
            lambda: repair_log(registry, acknowledge_lost=True),
        ],
    }[which]
    for action in actions:
        with pytest.raises(RegistryError, match=refusal):
            action()
    if location.startswith("s3://"):
        return  # SeaweedFS keeps an empty directory where a folder's last object was deleted (not S3's way)
    registry.store.delete(location)
    if which != "labels":
        (repair_champion if which == "champion" else repair_log)(registry)
    labels.set("canary", "v0001", "after")
    assert registry.champion() == "v0002" and labels.records()["canary"]["version"] == "v0001"


def test_clear_on_too_many_labels_removes_one_or_names_which(registry: Registry, tmp_path: Path, capsys) -> None:
    """On a labels.json of 9 labels (at most 8), `label canary --clear` said it removed them and exited 0,
    leaving the file as it was."""
    register(registry, 0.85)
    model = registry.manifest("v0001").files["model.keras"]
    nine = {f"l{i}": {"version": "v0001", "model_sha256": model, "at": "x", "reason": "r"} for i in range(9)}
    labels = Labels(registry)
    registry.store.write_bytes(labels.file, json.dumps(nine).encode())
    args = cli_args(registry, tmp_path)
    assert cli.main([*args, "label", "canary", "v0001"]) == 1
    assert "(NAME one of l0, l1, l2, l3, l4, l5, l6, l7, l8; keeping the others)" in capsys.readouterr().err
    assert cli.main([*args, "label", "canary", "--clear"]) == 1
    assert "no label 'canary'" in (err := capsys.readouterr().err) and "NAME one of l0, l1" in err
    assert json.loads(registry.store.read_bytes(labels.file)) == nine
    assert cli.main([*args, "label", "l8", "--clear"]) == 0
    assert "damaged" not in capsys.readouterr().out  # nothing unreadable was dropped: l8 alone
    assert sorted(labels.records()) == [f"l{i}" for i in range(8)]
