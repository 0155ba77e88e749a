"""The model registry: the promotion gate, immutable versions, concurrency, rollback, the CLI."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist import cli
from fmnist.model import ModelIntegrityError, TrainParams, load_verified_model
from fmnist.registry import Registry, RegistryError, decide
from tasks.train import train_model
from tests.helpers import learnable_cache, synthetic_images

TEST_SET = "test-set-a"


def manifest(accuracy: float, test_set: str = TEST_SET, run: str = "run") -> dict:
    return {
        "metrics": {"test_accuracy": accuracy},
        "data": {"test_set": test_set},
        "flow_run_id": run,
        "params": {"preset": "dnn"},
    }


def files(folder: Path, tag: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.keras").write_bytes(f"model {tag}".encode())
    (folder / "metrics.json").write_text(json.dumps({"tag": tag}))
    return {"model.keras": folder / "model.keras", "metrics.json": folder / "metrics.json"}


def register(registry: Registry, tmp: Path, accuracy: float, **kwargs):
    tag = f"{accuracy}-{len(registry.versions())}"
    return registry.register(files(tmp / tag, tag), manifest(accuracy, **kwargs), floor=0.8, tolerance=0.005)


def test_gate_floor_first_tolerance_and_force() -> None:
    champion = {"version": "v0001", "metrics": {"test_accuracy": 0.88}, "data": {"test_set": TEST_SET}}
    assert not decide(0.79, TEST_SET, None, floor=0.8, tolerance=0.005).promoted
    first = decide(0.85, TEST_SET, None, floor=0.8, tolerance=0.005)
    assert first.promoted and first.reason.startswith("first version to clear the floor")
    within = decide(0.876, TEST_SET, champion, floor=0.8, tolerance=0.005)
    assert within.promoted and (within.champion_version, within.champion_accuracy) == ("v0001", 0.88)
    worse = decide(0.874, TEST_SET, champion, floor=0.8, tolerance=0.005)
    assert not worse.promoted and "worse than champion v0001's 0.8800 by more than 0.0050" in worse.reason
    other = decide(0.95, "test-set-b", champion, floor=0.8, tolerance=0.005)
    assert not other.promoted and "another test set" in other.reason
    forced = decide(0.5, TEST_SET, champion, floor=0.8, tolerance=0.005, force=True)
    assert forced.promoted and forced.reason == "promotion forced by the operator"


def test_versions_are_numbered_immutable_and_self_describing(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "artifacts")
    assert register(registry, tmp_path, 0.85)[0] == "v0001"
    version, decision = register(registry, tmp_path, 0.70)  # below the floor: kept, not promoted
    assert version == "v0002" and not decision.promoted
    assert registry.versions() == ["v0001", "v0002"] and registry.champion() == "v0001"
    kept = registry.manifest("v0002")
    assert kept["decision"]["promoted"] is False and kept["version"] == "v0002"
    assert set(kept["files"]) == {"model.keras", "metrics.json"}
    assert registry.damaged_files("v0002") == []
    assert not list((tmp_path / "artifacts" / "versions").glob(".*"))  # no temp folders left


def test_worse_version_is_registered_but_not_promoted(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "artifacts")
    register(registry, tmp_path, 0.88)
    version, decision = register(registry, tmp_path, 0.86)
    assert not decision.promoted and registry.champion() == "v0001"
    assert registry.manifest(version)["decision"]["champion_accuracy"] == 0.88


def _register_in_process(args: tuple[str, int]) -> str:
    root, index = args
    registry = Registry(Path(root))
    folder = Path(root).parent / f"run-{index}"
    version, _ = registry.register(
        files(folder, str(index)), manifest(0.85 + index / 1000, run=f"run-{index}"), floor=0.8, tolerance=0.005
    )
    return version


def test_concurrent_registrations_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        versions = pool.map(_register_in_process, [(str(root), i) for i in range(12)])
    registry = Registry(root)
    assert sorted(versions) == registry.versions() == [f"v{i:04d}" for i in range(1, 13)]
    runs = {registry.manifest(v)["flow_run_id"] for v in registry.versions()}
    assert runs == {f"run-{i}" for i in range(12)}
    assert all(registry.damaged_files(v) == [] for v in registry.versions())
    log = [json.loads(line) for line in (root / "promotions.jsonl").read_text().splitlines()]
    promoted = [v for v in registry.versions() if registry.manifest(v)["decision"]["promoted"]]
    assert [entry["version"] for entry in log] == promoted  # every promotion logged, in order
    assert registry.champion() == promoted[-1]


def test_rollback_restores_the_previous_champion(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "artifacts")
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    register(registry, tmp_path, 0.85)
    register(registry, tmp_path, 0.87)
    register(registry, tmp_path, 0.89)
    assert registry.champion() == "v0003"
    assert registry.rollback() == "v0002" and registry.champion() == "v0002"
    assert registry.rollback() == "v0001"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    registry.promote("v0003", "back to the best")
    assert registry.champion_record()["previous"] == ["v0001"]
    events = [
        json.loads(line)["event"] for line in (tmp_path / "artifacts" / "promotions.jsonl").read_text().splitlines()
    ]
    assert events == ["promote", "promote", "promote", "rollback", "rollback", "promote"]


def test_damaged_version_is_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "artifacts")
    register(registry, tmp_path, 0.85)
    register(registry, tmp_path, 0.80)
    (registry.version_dir("v0002") / "model.keras").write_bytes(b"tampered")
    assert registry.damaged_files("v0002") == ["model.keras"]
    with pytest.raises(RegistryError, match=r"v0002 is damaged \(model.keras\)"):
        registry.promote("v0002", "try")
    assert registry.champion() == "v0001"


@pytest.fixture(scope="module")
def registry_with_model(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("reg")
    cached = learnable_cache(root / "cache")
    trained = train_model(cached, TrainParams(epochs=2, seed=1), root / "run")
    registry = Registry(root / "artifacts")
    registry.register({"model.keras": Path(trained.model_path)}, manifest(0.9), floor=0.8, tolerance=0.005)
    return registry


def test_champion_loads_only_when_its_hash_matches(registry_with_model: Registry, tmp_path: Path) -> None:
    path, sha256 = registry_with_model.champion_model_path()
    assert load_verified_model(path, sha256).output_shape == (None, 10)
    with pytest.raises(ModelIntegrityError, match="is not the recorded"):
        load_verified_model(path, "0" * 64)


def test_cli(registry_with_model: Registry, tmp_path: Path, capsys) -> None:
    root = ["--registry", str(registry_with_model.root)]
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

    wrong = tmp_path / "big.png"
    Image.new("L", (30, 30)).save(wrong)
    assert cli.main([*root, "predict", str(wrong)]) == 1
    assert "big.png: image is 30x30; expected 28x28" in capsys.readouterr().err
    assert cli.main([*root, "show", "v0009"]) == 1
    assert "no version 'v0009'" in capsys.readouterr().err
