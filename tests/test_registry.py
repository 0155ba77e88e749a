"""The model registry, on local disk and in a bucket of a real S3 server: the promotion gate, immutable
versions, concurrency from several processes, rollback, damage, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.ops import cli
from fmnist.registry.gate import decide
from fmnist.registry.log_repair import repair_champion
from fmnist.registry.registration import prior_run
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import IntegrityError, StorageError, Store, StoredFile, join
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams, load_verified_model
from tests.helpers import GATE, learnable_cache, local_run, run_manifest, synthetic_images, version_manifest
from tests.processes import forked_processes
from tests.s3_proxy import lossy_proxy
from tests.seaweedfs import S3Server, seaweedfs

TEST_SET = "test-set-a"


def run_files(store: Store, run_dir: str, tag: str) -> dict[str, StoredFile]:
    """A run's files, published in its folder as the training and evaluation stages do."""
    files = {}
    for name, data in (("model.keras", f"model {tag}".encode()), ("metrics.json", json.dumps({"tag": tag}).encode())):
        store.write_bytes(join(run_dir, name), data)
        files[name] = StoredFile(join(run_dir, name), hashlib.sha256(data).hexdigest())
    return files


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    """A registry on each storage backend in turn."""
    return Registry(store, root + "/registry")


def register(registry: Registry, accuracy: float, **kwargs):
    tag = f"{accuracy}-{len(registry.versions())}"
    files = run_files(registry.store, join(registry.root, "runs", tag), tag)
    return registry.register(files, run_manifest(accuracy, **kwargs), GATE)


def test_gate_floor_first_tolerance_and_force() -> None:
    champion = version_manifest("v0001", 0.88, TEST_SET)
    assert not decide(0.79, TEST_SET, None, GATE).passed
    first = decide(0.85, TEST_SET, None, GATE)
    assert first.passed and first.reason.startswith("first version to clear the floor")
    within = decide(0.876, TEST_SET, champion, GATE)
    assert within.passed and (within.champion_version, within.champion_accuracy) == ("v0001", 0.88)
    worse = decide(0.874, TEST_SET, champion, GATE)
    assert not worse.passed and "worse than champion v0001's 0.8800 by more than 0.0050" in worse.reason
    other = decide(0.95, "test-set-b", champion, GATE)
    assert not other.passed and "another test set" in other.reason
    forced = decide(0.5, TEST_SET, champion, GATE.model_copy(update={"force": True}))
    assert forced.passed and forced.reason == "promotion forced by the operator"
    best = version_manifest("v0000", 0.89, TEST_SET)
    below_best = decide(0.882, TEST_SET, champion, GATE, best=best)
    assert not below_best.passed and "worse than v0000's 0.8900, the best champion so far" in below_best.reason
    assert (below_best.best_version, below_best.best_accuracy) == ("v0000", 0.89)
    assert decide(0.886, TEST_SET, champion, GATE, best=best).passed
    other_best = version_manifest("v0000", 0.89, "test-set-b")  # not comparable: not a yardstick
    assert decide(0.876, TEST_SET, champion, GATE, best=other_best).passed


def test_the_tolerance_does_not_ratchet_accuracy_down_night_after_night(registry: Registry) -> None:
    assert register(registry, 0.880).promoted
    assert register(registry, 0.876).promoted  # within 0.005 of v0001
    ratchet = register(registry, 0.872)  # within 0.005 of v0002, but 0.008 below v0001
    assert not ratchet.promoted and "worse than v0001's 0.8800, the best champion so far" in ratchet.decision.reason
    registry.rollback()  # v0002 taken out of service: v0001 is champion, and the chain is [v0001]
    assert register(registry, 0.877).promoted
    registry.store.delete(registry.version_dir("v0001"))  # a deleted version is no longer a yardstick
    assert register(registry, 0.873).promoted  # within 0.005 of v0004, the champion


def test_versions_are_numbered_immutable_and_self_describing(registry: Registry) -> None:
    first = register(registry, 0.85)
    assert (first.version, first.promoted, first.champion) == ("v0001", True, "v0001")
    kept = register(registry, 0.70)  # below the floor: kept, not promoted
    assert (kept.version, kept.promoted, kept.decision.passed) == ("v0002", False, False)
    assert registry.versions() == ["v0001", "v0002"] and registry.champion() == "v0001"
    record = registry.manifest("v0002")
    assert record.gate.passed is False and record.version == "v0002"
    assert set(record.files) == {"model.keras", "metrics.json"}
    assert registry.damaged_files("v0002") == []
    assert registry.store.read_bytes(join(registry.version_dir("v0002"), "model.keras")) == b"model 0.7-1"
    assert [(e["sequence"], e["event"], e["version"]) for e in registry.promotions()] == [(1, "promote", "v0001")]


def test_worse_version_is_registered_but_not_promoted(registry: Registry) -> None:
    register(registry, 0.88)
    worse = register(registry, 0.86)
    assert not worse.promoted and registry.champion() == "v0001"
    assert registry.manifest(worse.version).gate.champion_accuracy == 0.88


def test_a_run_file_that_changed_after_evaluation_is_not_registered(registry: Registry) -> None:
    files = run_files(registry.store, join(registry.root, "runs", "r"), "evaluated")
    registry.store.write_bytes(files["model.keras"].location, b"swapped after evaluation")
    with pytest.raises(IntegrityError, match=r"model\.keras: sha256 .* is not the recorded"):
        registry.register(files, run_manifest(0.9), GATE)
    assert registry.versions() == [] and registry.champion() is None


def test_an_upload_cut_short_before_the_manifest_publishes_nothing(registry: Registry, monkeypatch) -> None:
    register(registry, 0.85)
    real_put, calls = registry.store.put_file, []

    def dies_on_second_file(local: Path, location: str) -> None:
        calls.append(location)
        if len(calls) == 2:
            raise StorageError(f"{location}: connection reset")
        real_put(local, location)

    monkeypatch.setattr(registry.store, "put_file", dies_on_second_file)
    with pytest.raises(StorageError, match="connection reset"):
        register(registry, 0.95)
    monkeypatch.setattr(registry.store, "put_file", real_put)
    # v0002 was claimed and half uploaded, but without its manifest it does not exist for any reader.
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
    with pytest.raises(RegistryError, match="no version 'v0002'"):
        registry.manifest("v0002")
    assert register(registry, 0.9).version == "v0003"  # its number is never reused


def test_rollback_restores_the_previous_champion(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    register(registry, 0.85)
    register(registry, 0.87)
    register(registry, 0.89)
    assert registry.champion() == "v0003"
    assert registry.rollback() == "v0002" and registry.champion() == "v0002"
    assert registry.rollback() == "v0001"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    registry.promote("v0003", "back to the best")
    assert registry.champion_record()["previous"] == ["v0001"]
    log = registry.promotions()
    assert [e["event"] for e in log] == ["promote", "promote", "promote", "rollback", "rollback", "promote"]
    assert [e["sequence"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["reason"] == "back to the best" and log[-1]["replaced"] == "v0001"


def test_damaged_version_is_refused(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.80)
    registry.store.write_bytes(join(registry.version_dir("v0002"), "model.keras"), b"tampered")
    assert registry.damaged_files("v0002") == ["model.keras"]
    with pytest.raises(RegistryError, match=r"v0002 is damaged \(model.keras\)"):
        registry.promote("v0002", "try")
    assert registry.champion() == "v0001"
    registry.store.delete(join(registry.version_dir("v0001"), "metrics.json"))
    register(registry, 0.86)  # v0003 becomes champion; rolling back to the damaged v0001 is refused
    with pytest.raises(RegistryError, match=r"cannot roll back to v0001: v0001 is damaged \(metrics.json\)"):
        registry.rollback()
    assert registry.champion() == "v0003"


def test_a_manifest_of_the_first_format_still_reads_and_gates(registry: Registry, capsys, tmp_path: Path) -> None:
    register(registry, 0.85)
    location = join(registry.version_dir("v0001"), "manifest.json")
    record = registry.manifest("v0001").to_json()
    gate = record.pop("gate")  # the first manifests called the verdict "decision", with "promoted"
    old = {**record, "decision": {**gate, "promoted": gate.pop("passed")}, "added_later": {"kept": True}}
    registry.store.write_bytes(location, json.dumps(old).encode())
    assert registry.manifest("v0001").gate.passed and registry.manifest("v0001").to_json()["added_later"]["kept"]
    worse = register(registry, 0.84)  # gated against the old-format champion
    assert not worse.promoted and worse.decision.champion_accuracy == 0.85
    assert cli.main(["--registry", registry.root, "--scratch", str(tmp_path), "versions"]) == 0
    assert "v0001" in capsys.readouterr().out


def test_a_manifest_that_is_not_a_manifest_is_named(registry: Registry) -> None:
    register(registry, 0.85)
    location = join(registry.version_dir("v0001"), "manifest.json")
    registry.store.write_bytes(location, json.dumps({"version": "v0001", "metrics": "high"}).encode())
    with pytest.raises(
        RegistryError, match=rf"{location}: the version's manifest is damaged \(fingerprint: Field"
    ) as e:
        registry.manifest("v0001")
    assert "; and 7 more)" in str(e.value) and "\n" not in str(e.value)


def test_stray_folders_and_large_numbers_are_handled(registry: Registry) -> None:
    register(registry, 0.85)
    registry.store.write_bytes(join(registry.versions_root, "v0003-backup", "manifest.json"), b"{}")
    registry.store.write_bytes(join(registry.versions_root, "notes.txt"), b"hello")
    registry.store.create(join(registry.versions_root, "v9999", "claim.json"), b"{}")
    assert registry.versions() == ["v0001"]
    assert register(registry, 0.86).version == "v10000"
    assert register(registry, 0.87).version == "v10001"
    assert registry.versions() == ["v0001", "v10000", "v10001"] and registry.champion() == "v10001"


def test_damaged_champion_pointer_is_named_and_promote_repairs_it(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.86)
    registry.store.write_bytes(registry.champion_file, b"{not json")
    with pytest.raises(RegistryError, match=r"champion\.json: the champion pointer is damaged"):
        registry.champion()
    with pytest.raises(RegistryError, match="the champion pointer is damaged"):
        register(registry, 0.9)
    registry.promote("v0001", "repair")
    assert registry.champion() == "v0001" and registry.promotions()[-1]["sequence"] == 3


def test_a_first_champion_set_while_it_is_read_is_not_damage(registry: Registry, monkeypatch) -> None:
    """A reader found no pointer, then the audit log's first entry: another host had set and logged the
    first champion in between. Eight hosts registering at once read this as a missing pointer."""
    register(registry, 0.85)
    read = registry._read_champion
    reads = []

    def none_at_first(**kwargs):
        reads.append(kwargs)
        return (None, None) if len(reads) == 1 else read(**kwargs)

    monkeypatch.setattr(registry, "_read_champion", none_at_first)
    assert registry.champion() == "v0001" and len(reads) == 2
    registry.store.delete(registry.champion_file)  # and a pointer that stays missing is still damage
    with pytest.raises(RegistryError, match="missing, though the audit log records 1 champion changes"):
        registry.champion()


# --- many hosts at once: processes that share only the store -------------------------------------


def _register_in_process(args: tuple[str, str, int, dict]) -> tuple[str, bool]:
    root, scratch, index, env = args
    os.environ.update(env)
    store = Store(scratch=Path(scratch))
    registry = Registry(store, root)
    files = run_files(store, join(root, "runs", f"run-{index}"), str(index))
    registered = registry.register(files, run_manifest(0.85 + index / 1000, run=f"run-{index}"), GATE)
    return registered.version, registered.promoted


def test_concurrent_registrations_lose_nothing(registry: Registry, tmp_path: Path, s3_server: S3Server) -> None:
    jobs = [(registry.root, str(tmp_path / f"host-{i}"), i, s3_server.env()) for i in range(8)]
    with forked_processes().Pool(8) as pool:
        results = pool.map(_register_in_process, jobs)
    versions = [version for version, _ in results]
    assert sorted(versions) == registry.versions() == [f"v{i:04d}" for i in range(1, 9)]
    runs = {registry.manifest(v).flow_run_id for v in registry.versions()}
    assert runs == {f"run-{i}" for i in range(8)}
    assert all(registry.damaged_files(v) == [] for v in registry.versions())
    # Every promotion is in the audit log exactly once, in order, and the pointer is its last entry.
    log = registry.promotions()
    assert [e["sequence"] for e in log] == list(range(1, len(log) + 1))
    assert sorted(e["version"] for e in log) == sorted(v for v, promoted in results if promoted)
    assert registry.champion() == log[-1]["version"] and registry.champion_record()["sequence"] == len(log)
    assert [e["replaced"] for e in log] == [None] + [e["version"] for e in log[:-1]]


def _promote_in_process(args: tuple[str, str, str, dict]) -> None:
    root, scratch, version, env = args
    os.environ.update(env)
    Registry(Store(scratch=Path(scratch)), root).promote(version, f"by host {version}")


def test_racing_promotions_are_both_applied_and_logged(registry: Registry, tmp_path: Path, s3_server) -> None:
    for accuracy in (0.85, 0.84, 0.83, 0.82):  # v0001 champion, the others kept back
        register(registry, accuracy)
    jobs = [(registry.root, str(tmp_path / v), v, s3_server.env()) for v in ("v0002", "v0003", "v0004")]
    with forked_processes().Pool(3) as pool:
        pool.map(_promote_in_process, jobs)
    log = registry.promotions()
    assert [e["sequence"] for e in log] == [1, 2, 3, 4]
    assert sorted(e["version"] for e in log[1:]) == ["v0002", "v0003", "v0004"]
    assert [e["replaced"] for e in log[1:]] == [e["version"] for e in log[:-1]]  # a chain: no update lost
    assert registry.champion() == log[-1]["version"]


# --- models and the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reg")
    cached = learnable_cache(root / "cache")
    return train_model(cached, TrainParams(epochs=2, seed=1), local_run(root / "run"))


@pytest.fixture
def registry_with_model(registry: Registry, trained_model) -> Registry:
    registry.register({"model.keras": trained_model.model}, run_manifest(0.9), GATE)
    return registry


@pytest.mark.training
def test_champion_loads_only_when_its_hash_matches(registry_with_model: Registry) -> None:
    registry = registry_with_model
    assert load_verified_model(registry.store, registry.champion_model()).output_shape == (None, 10)
    model_file = join(registry.version_dir("v0001"), "model.keras")
    data = bytearray(registry.store.read_bytes(model_file))
    data[len(data) // 2] ^= 0xFF
    registry.store.write_bytes(model_file, bytes(data))
    with pytest.raises(IntegrityError, match=r"v0001/model\.keras: sha256 \w+ is not the recorded"):
        load_verified_model(registry.store, registry.champion_model())


@pytest.mark.training
def test_cli(registry_with_model: Registry, tmp_path: Path, capsys) -> None:
    root = ["--registry", registry_with_model.root, "--scratch", str(tmp_path / "cli-scratch")]
    images = []
    for label in (1, 7, 9):
        path = tmp_path / f"class-{label}.png"
        Image.fromarray(synthetic_images(np.array([label]), seed=label)[0]).save(path)
        images.append(str(path))
    assert cli.main([*root, "predict", *images]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "champion v0001"
    assert [line.split("\t")[1] for line in out[1:]] == ["Trouser", "Sneaker", "Ankle boot"]

    assert cli.main([*root, "versions"]) == 0
    assert "* v0001" in capsys.readouterr().out
    assert cli.main([*root, "show", "v0001"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["champion"] is True and shown["files_intact"] is True
    assert cli.main([*root, "promotions"]) == 0
    assert "promote  v0001   (was none)" in capsys.readouterr().out

    wrong = tmp_path / "big.png"
    Image.new("L", (30, 30)).save(wrong)
    assert cli.main([*root, "predict", str(wrong)]) == 1
    assert "big.png: image is 30x30; expected 28x28" in capsys.readouterr().err
    assert cli.main([*root, "show", "v0009"]) == 1
    assert "no version 'v0009'" in capsys.readouterr().err


def test_cli_names_a_missing_bucket_and_refused_credentials(s3_env: S3Server, monkeypatch, capsys, tmp_path) -> None:
    scratch = ["--scratch", str(tmp_path)]
    assert cli.main(["--registry", "s3://no-such-bucket-here/registry", *scratch, "versions"]) == 1
    err = capsys.readouterr().err
    assert "s3://no-such-bucket-here/registry/champion.json: bucket 'no-such-bucket-here' does not exist at" in err
    bucket = s3_env.new_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert cli.main(["--registry", f"s3://{bucket}/registry", *scratch, "versions"]) == 1
    err = capsys.readouterr().err
    assert f"s3://{bucket}/registry/champion.json: access denied" in err and "check AWS_ACCESS_KEY_ID" in err
    assert "not-the-secret" not in err


# --- a careless operator, a damaged pointer, a crash, an edited version -----------------------------


def snapshot(registry: Registry) -> dict[str, bytes]:
    return {name: registry.store.read_bytes(join(registry.root, name)) for name in registry.store.find(registry.root)}


def test_only_version_names_of_the_registry_are_accepted(registry: Registry, tmp_path: Path, capsys) -> None:
    register(registry, 0.85)
    register(registry, 0.86)
    before = snapshot(registry)
    outside = tmp_path / "some" / "other" / "folder"
    outside.mkdir(parents=True)
    (outside / "manifest.json").write_text(json.dumps({"files": {}}))
    root = ["--registry", registry.root, "--scratch", str(tmp_path / "scratch")]
    for name in (str(outside), "../v0001", "versions/v0001", "v1", "v0001-backup"):
        assert cli.main([*root, "promote", name]) == 1
        assert f"no version {name!r} in {registry.root} (versions: v0001, v0002)" in capsys.readouterr().err
    assert snapshot(registry) == before


def test_a_damaged_champion_pointer_is_reported_and_repaired_from_the_audit_log(
    registry: Registry, tmp_path: Path, capsys
) -> None:
    for accuracy in (0.85, 0.86, 0.87):
        register(registry, accuracy)
    registry.rollback()  # champion v0002, previous [v0001]
    expected = registry.champion_record()
    registry.store.write_bytes(registry.champion_file, b'{"version": "v00')  # torn by a crash or a careless edit
    root = ["--registry", registry.root, "--scratch", str(tmp_path / "scratch")]

    assert cli.main([*root, "versions"]) == 0  # still lists what there is, to repair from
    captured = capsys.readouterr()
    assert "champion.json: the champion pointer is damaged" in captured.err
    assert "v0003" in captured.out and "* champion: damaged" in captured.out
    assert cli.main([*root, "rollback"]) == 1
    assert "the champion pointer is damaged" in capsys.readouterr().err
    versions_before = registry.store.find(registry.versions_root)
    with pytest.raises(RegistryError, match="the champion pointer is damaged"):
        register(registry, 0.9)
    assert registry.store.find(registry.versions_root) == versions_before  # no number was taken

    assert cli.main([*root, "repair-champion"]) == 0
    assert "restored from change 4 of the audit log: v0002 is the champion" in capsys.readouterr().out
    assert registry.champion_record() == {k: v for k, v in expected.items() if k != "token"}  # the writer's own
    assert registry.rollback() == "v0001"  # the history came back with it
    assert cli.main([*root, "repair-champion"]) == 1
    assert "is intact (champion v0001); nothing to repair" in capsys.readouterr().err


def test_cli_promote_and_rollback_move_the_champion(registry: Registry, tmp_path: Path, capsys) -> None:
    register(registry, 0.85)
    register(registry, 0.86)
    root = ["--registry", registry.root, "--scratch", str(tmp_path / "scratch")]
    assert cli.main([*root, "promote", "v0001", "--reason", "v0002 misbehaves"]) == 0
    assert f"v0001 is now the champion of {registry.root}" in capsys.readouterr().out and registry.champion() == "v0001"
    assert cli.main([*root, "rollback"]) == 0
    assert f"v0002 is the champion of {registry.root} again (was v0001)" in capsys.readouterr().out
    assert registry.champion() == "v0002"
    assert cli.main([*root, "promote", "v0002"]) == 1
    assert "v0002 is already the champion" in capsys.readouterr().err
    assert [(e["event"], e["version"], e["reason"]) for e in registry.promotions()][2:] == [
        ("promote", "v0001", "v0002 misbehaves"),
        ("rollback", "v0002", "rolled back by the operator"),
    ]


def test_rollback_to_a_deleted_version_is_refused(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.86)
    registry.store.delete(registry.version_dir("v0001"))
    pointer = registry.store.read_bytes(registry.champion_file)
    with pytest.raises(RegistryError, match=r"cannot roll back to v0001: no version 'v0001' in .* \(versions: v0002\)"):
        registry.rollback()
    assert registry.store.read_bytes(registry.champion_file) == pointer


def test_a_model_replaced_together_with_its_manifest_is_refused(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.86)  # champion v0002; v0001 was champion with its own model
    registry.rollback()  # v0001 in service again
    for version in ("v0001", "v0002"):
        folder = registry.version_dir(version)
        swapped = f"a model someone swapped into {version}".encode()
        registry.store.write_bytes(join(folder, "model.keras"), swapped)
        record = registry.manifest(version).to_json()
        record["files"]["model.keras"] = hashlib.sha256(swapped).hexdigest()
        registry.store.write_bytes(join(folder, "manifest.json"), json.dumps(record).encode())
        assert registry.damaged_files(version) == []  # its own manifest vouches for it: not enough
    with pytest.raises(RegistryError, match=r"v0001's manifest records model sha256 \w+, but it was made champion"):
        registry.champion_model()
    with pytest.raises(RegistryError, match=r"refusing to promote v0002: v0002's model hashes to \w+, not the \w+ it"):
        registry.promote("v0002", "try")
    assert registry.champion() == "v0001"


def test_a_copy_that_does_not_verify_publishes_no_version(registry: Registry, monkeypatch) -> None:
    register(registry, 0.85)
    before = {k: v for k, v in snapshot(registry).items() if "runs/" not in k}
    put_file = registry.store.put_file

    def flipping_put_file(local: Path, location: str) -> None:
        put_file(local, location)
        if location.endswith("model.keras"):  # a bit flipped on the way, by the disk or the network
            registry.store.write_bytes(location, registry.store.read_bytes(location)[:-1] + b"?")

    monkeypatch.setattr(registry.store, "put_file", flipping_put_file)
    with pytest.raises(IntegrityError, match=r"v0002/model.keras: the copy hashes to \w+, not the recorded"):
        register(registry, 0.9)
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
    assert {k: v for k, v in snapshot(registry).items() if "v0002" not in k and "runs/" not in k} == before


def test_a_version_whose_run_stopped_before_the_champion_moved_is_promoted_next_time(
    registry: Registry, monkeypatch, capsys, tmp_path: Path
) -> None:
    register(registry, 0.85)

    def killed(change) -> None:
        raise KeyboardInterrupt("the host died before the champion pointer moved")

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(registry, "_move_champion", killed)
        files = run_files(registry.store, join(registry.root, "runs", "crashed"), "crashed")
        registry.register(files, run_manifest(0.9, fingerprint="fp-crashed"), GATE)
    assert registry.champion() == "v0001" and registry.manifest("v0002").gate.passed
    assert cli.main(["--registry", registry.root, "--scratch", str(tmp_path), "versions"]) == 0
    assert "passed the gate, never champion" in capsys.readouterr().out

    prior = prior_run(registry, "fp-crashed", GATE)
    assert (prior.version, prior.promoted, prior.champion) == ("v0002", True, "v0002")
    assert "never became champion" in prior.message and registry.champion() == "v0002"
    assert prior_run(registry, "fp-crashed", GATE).message.startswith("Champion v0002 is current")


def test_a_version_rolled_back_from_is_not_put_back_by_the_schedule(registry: Registry) -> None:
    register(registry, 0.85)
    files = run_files(registry.store, join(registry.root, "runs", "bad-in-service"), "bad")
    registry.register(files, run_manifest(0.9, fingerprint="fp-2"), GATE)
    registry.rollback("it misbehaved in service")
    prior = prior_run(registry, "fp-2", GATE)
    assert (prior.version, prior.promoted, prior.champion) == ("v0002", False, "v0001")
    assert "it was champion and was replaced" in prior.message and registry.champion() == "v0001"
    assert prior_run(registry, "fp-never-seen", GATE) is None


def test_a_deleted_champion_pointer_is_damage_not_a_first_version(registry: Registry) -> None:
    """With versions and the audit log intact, a deleted champion.json made the next registration a "first
    version": 0.81 promoted over a 0.93 champion."""
    assert register(registry, 0.93).promoted
    registry.store.delete(registry.champion_file)
    with pytest.raises(
        RegistryError, match=r"missing, though the audit log records 1 champion changes.*repair-champion"
    ):
        register(registry, 0.81)
    assert registry.versions() == ["v0001"]  # refused before a number was claimed
    assert repair_champion(registry)["version"] == "v0001"
    worse = register(registry, 0.81)
    assert not worse.promoted and registry.champion() == "v0001"


def test_a_stray_file_in_the_audit_log_is_skipped(registry: Registry) -> None:
    """A `.part-*` left by an interrupted write disabled rollback, versions and every run."""
    register(registry, 0.85)
    register(registry, 0.86)
    registry.store.write_bytes(join(registry.log_root, ".part-1234-00000003.json"), b'{"seq')
    registry.store.write_bytes(join(registry.log_root, "notes.txt"), b"an operator's notes")
    assert [e["version"] for e in registry.promotions()] == ["v0001", "v0002"]
    assert registry.rollback() == "v0001"
    assert register(registry, 0.87).promoted and [e["sequence"] for e in registry.promotions()] == [1, 2, 3, 4]


def test_a_torn_audit_log_entry_is_named(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.86)
    registry.store.write_bytes(join(registry.log_root, "00000001.json"), b'{"sequence": 1, "ver')
    with pytest.raises(RegistryError, match=r"00000001\.json: a damaged audit log entry"):
        registry.promotions()
    registry.store.delete(join(registry.log_root, "00000001.json"))
    with pytest.raises(RegistryError, match="the audit log misses change 1"):
        registry.champion()


def test_a_champion_pointer_restored_from_an_older_copy_is_caught_and_repaired(registry: Registry) -> None:
    """An older champion.json restored from a backup made the next change reuse a logged sequence number,
    whose log write was silently skipped, and repair-champion later restored the wrong version."""
    register(registry, 0.85)
    old = registry.store.read_bytes(registry.champion_file)
    register(registry, 0.86)
    register(registry, 0.87)
    registry.store.write_bytes(registry.champion_file, old)  # v0001, change 1, from the backup
    with pytest.raises(RegistryError, match=r"it is change 1 \(v0001\), but the audit log records changes up to 3"):
        registry.champion()
    with pytest.raises(RegistryError, match="restored from an older copy"):
        register(registry, 0.88)
    assert repair_champion(registry)["version"] == "v0003"
    assert register(registry, 0.88).promoted
    assert [(e["sequence"], e["version"]) for e in registry.promotions()] == [
        (1, "v0001"),
        (2, "v0002"),
        (3, "v0003"),
        (4, "v0004"),
    ]


def test_an_edited_champion_pointer_is_caught(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.86)
    record = json.loads(registry.store.read_bytes(registry.champion_file))
    registry.store.write_bytes(registry.champion_file, json.dumps({**record, "version": "v0001"}).encode())
    with pytest.raises(RegistryError, match="records change 2 differently"):
        registry.champion()


@pytest.mark.parametrize(
    "pointer",
    [
        {"version": "v0001", "sequence": 1},  # no `previous`: tracebacks before
        {"version": "v0001", "sequence": 1, "previous": "v0000"},
        {"version": "v0001", "sequence": "1", "previous": []},
        {"version": "v0001", "sequence": 1, "previous": [], "model_sha256": 5},
        {"version": "../v0001", "sequence": 1},
        ["v0001"],
    ],
)
def test_a_champion_pointer_of_the_wrong_shape_is_named(registry: Registry, pointer) -> None:
    register(registry, 0.85)
    registry.store.write_bytes(registry.champion_file, json.dumps(pointer).encode())
    try:
        champion = registry.champion()
    except RegistryError as exc:
        assert "champion.json" in str(exc) and "repair-champion" in str(exc)
    else:  # only a pointer that is the log's own change, less its `previous`, reads
        assert champion == "v0001" and pointer == {"version": "v0001", "sequence": 1}
        assert registry.champion_record()["previous"] == []


def test_a_deleted_version_folder_never_frees_its_number(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.70)  # v0002, kept back
    registry.store.delete(join(registry.versions_root, "v0002"))
    assert register(registry, 0.70).version == "v0003"  # kept back: without its claim it no longer counts
    registry.store.delete(join(registry.claims_root, "v0003.json"))  # one of its two claims
    assert register(registry, 0.86).version == "v0004"


def test_a_manifest_with_a_knob_this_code_does_not_know_still_reads(registry: Registry, capsys, tmp_path) -> None:
    """A manifest from a newer (or older) commit made every registration, prior-run check and `versions`
    fail: "Extra inputs are not permitted"."""
    register(registry, 0.85)
    location = join(registry.version_dir("v0001"), "manifest.json")
    record = json.loads(registry.store.read_bytes(location))
    record["params"] = {**record["params"], "warmup_epochs": 3, "seed": 2**40}
    registry.store.write_bytes(location, json.dumps(record).encode())
    assert registry.manifest("v0001").to_json()["params"]["warmup_epochs"] == 3
    assert register(registry, 0.86).promoted
    assert prior_run(registry, "fp", GATE) is not None
    assert cli.main(["--registry", registry.root, "--scratch", str(tmp_path / "s"), "versions"]) == 0
    assert "v0001" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../../outside.txt", "/tmp/absolute", "saved_model/1/../../../x"])
def test_a_manifest_naming_files_outside_its_folder_is_damaged(registry: Registry, tmp_path: Path, name: str) -> None:
    register(registry, 0.85)
    location = join(registry.version_dir("v0001"), "manifest.json")
    record = json.loads(registry.store.read_bytes(location))
    record["files"][name] = "0" * 64
    registry.store.write_bytes(location, json.dumps(record).encode())
    with pytest.raises(RegistryError, match=r"the version.s manifest is damaged .*not a name inside"):
        registry.manifest("v0001")
    out = tmp_path / "export"
    assert cli.main(
        ["--registry", registry.root, "--scratch", str(tmp_path / "s"), "export", "v0001", "--out", str(out)]
    )
    assert not (tmp_path / "outside.txt").exists() and not out.exists()


def test_a_checkpoint_snapshot_naming_files_outside_its_folder_is_not_restored(
    store: Store, bucket: str, tmp_path: Path
) -> None:
    """Restoring a snapshot wrote each of its record's names under the local backup folder, `..` and all."""
    from fmnist.storage.layout import RunLayout
    from fmnist.training.run_folder import SNAPSHOT_MARKER, RunFolder

    run = RunFolder(store, RunLayout(join(bucket, "runs", "r1")))
    good, evil = b"weights of epoch 1", b"not a checkpoint"
    first = join(run.file("backup"), "epoch-00001")
    store.write_bytes(join(first, "latest.weights.h5"), good)
    store.write_json(join(first, SNAPSHOT_MARKER), {"epoch": 1, "files": {"latest.weights.h5": _sha(good)}})
    # An absolute name: joined to the snapshot's location it named a file of this host, read and
    # written outside both folders.
    outside = tmp_path / "elsewhere" / "latest.weights.h5"
    outside.parent.mkdir()
    outside.write_bytes(evil)
    second = join(run.file("backup"), "epoch-00002")
    for name in (str(outside), "../epoch-00001/latest.weights.h5"):
        store.write_json(join(second, SNAPSHOT_MARKER), {"epoch": 2, "files": {name: _sha(evil)}})
        assert run.restore() == 1  # the damaged snapshot is passed over for the one before
        assert (run.backup_dir / "latest.weights.h5").read_bytes() == good
        assert sorted(p.name for p in run.backup_dir.iterdir()) == ["latest.weights.h5"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_registration_whose_writes_each_lose_their_first_answer_registers_once(
    s3_env: S3Server, bucket: str, tmp_path: Path, monkeypatch
) -> None:
    """Each claim's first acknowledgement lost: the retry met its own claim, took it for another writer's,
    and claimed the next number, for ever (56,000 numbers in 15 minutes)."""
    from tests.s3_proxy import lossy_proxy

    with lossy_proxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        registry = Registry(Store(scratch=tmp_path / "scratch", timeout_s=5), bucket + "/registry")
        proxy.lose_every_first = True
        first, second = register(registry, 0.85), register(registry, 0.86)
        proxy.lose_every_first = False
        assert proxy.answers_lost >= 8  # two claims, a manifest, a pointer move and a log entry each
    assert (first.version, second.version) == ("v0001", "v0002") and second.promoted
    assert registry.store.listdir(registry.claims_root) == ["v0001.json", "v0002.json"]
    assert [(e["sequence"], e["version"]) for e in registry.promotions()] == [(1, "v0001"), (2, "v0002")]
    assert registry.champion() == "v0002"


@pytest.fixture(scope="module")
def unchecked_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS of this module's own that checks no signature, so a proxy may drop a request's conditions."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs-unchecked"), check_credentials=False) as server:
        yield server


def test_a_store_that_ignores_conditional_writes_is_refused_before_anything_is_claimed(
    unchecked_s3: S3Server, tmp_path: Path, monkeypatch
) -> None:
    for name, value in unchecked_s3.env().items():
        monkeypatch.setenv(name, value)
    root = f"s3://{unchecked_s3.new_bucket()}/registry"
    with lossy_proxy(unchecked_s3.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        proxy.ignore_conditions = True
        registry = Registry(Store(scratch=tmp_path / "scratch", timeout_s=5), root)
        with pytest.raises(StorageError, match="ignores conditional writes") as refused:
            register(registry, 0.9)
        assert proxy.endpoint in str(refused.value)
        assert "If-None-Match" in str(refused.value) and "If-Match" in str(refused.value)
        # Nothing claimed, no champion, no probe left: only the run's own files (written before it).
        assert all(path.startswith("runs/") for path in registry.store.find(root)), registry.store.find(root)
        assert registry.champion() is None

        proxy.ignore_conditions = False  # the same store honouring them: the check passes, once
        registered = register(Registry(Store(scratch=tmp_path / "scratch", timeout_s=5), root), 0.9)
        assert registered.version == "v0001" and registered.promoted
        assert not any(".write-check" in path for path in registry.store.find(root))


def test_the_store_gone_mid_publish_leaves_no_version_and_the_next_run_registers_once(
    s3_env: S3Server, bucket: str, tmp_path: Path, monkeypatch
) -> None:
    """SeaweedFS stops while a version's files upload (the proxy drops every connection from one PUT
    on), then comes back: no manifest means no version, the claimed number is not given again, the
    champion pointer is untouched, and the next registration publishes exactly one version."""
    with lossy_proxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        registry = Registry(Store(scratch=tmp_path / "scratch", timeout_s=5), f"{bucket}/registry")
        assert register(registry, 0.9).version == "v0001"
        champion_before = registry.store.read_bytes(registry.champion_file)
        files = run_files(registry.store, join(registry.root, "runs", "second"), "second")
        proxy.down_after_puts = 2  # the two claims land; the first file's upload meets a stopped store
        with pytest.raises(StorageError, match=f"cannot reach the object store at {proxy.endpoint}"):
            registry.register(files, run_manifest(0.95), GATE)
        assert proxy.down
        proxy.down = False  # started again
        assert registry.versions() == ["v0001"]
        assert registry.store.read_bytes(registry.champion_file) == champion_before
        again = registry.register(files, run_manifest(0.95), GATE)
        assert again.version == "v0003" and again.promoted  # v0002 was claimed: never issued twice
        assert registry.versions() == ["v0001", "v0003"] and registry.champion() == "v0003"
        assert [entry["version"] for entry in registry.promotions()] == ["v0001", "v0003"]
