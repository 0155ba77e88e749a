"""What registration keeps for the rollout's judge, read back from the registry on disk and in a bucket: the
manifest's calibration (validated: a bad field is named) and each version's test predictions (checked: a
file that is damaged, pickled, of the wrong shape or type, or names no class is refused, naming the file)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest

from fmnist.evaluation.estimates import expected_agreement, fit_calibration
from fmnist.registry.predictions import paired_test_predictions, read_test_predictions
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import Store, StoredFile, join
from fmnist.storage.layout import RunLayout
from tests.helpers import GATE, run_manifest

TEST_ROWS = 100  # run_manifest's test set


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    return Registry(store, root + "/registry")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def register(registry: Registry, predictions: bytes | None, tag: str, test_set: str = "test-set-a") -> str:
    """A version with a calibration fitted on made-up answers, and `predictions` as its test_predictions.npy."""
    rng = np.random.default_rng(len(tag))
    labels = rng.integers(0, 10, TEST_ROWS)
    probabilities = rng.dirichlet(np.ones(10), TEST_ROWS)
    manifest = run_manifest(0.9, test_set=test_set, run=tag).model_copy(
        update={"calibration": fit_calibration(probabilities, labels)}
    )
    files = {}
    run_dir = join(registry.root, "runs", tag)
    for name, data in (("model.keras", tag.encode()), (RunLayout.TEST_PREDICTIONS, predictions)):
        if data is not None:
            registry.store.write_bytes(join(run_dir, name), data)
            files[name] = StoredFile(join(run_dir, name), hashlib.sha256(data).hexdigest())
    return registry.register(files, manifest, GATE).version


def test_calibration_and_predictions_round_trip_and_pair(registry: Registry) -> None:
    stable_classes = np.arange(TEST_ROWS, dtype=np.uint8) % 10
    candidate_classes = stable_classes.copy()
    candidate_classes[:20] = 9 - candidate_classes[:20]  # disagrees on the first 20 images
    stable = register(registry, npy(stable_classes), "stable")
    candidate = register(registry, npy(candidate_classes), "candidate")
    calibration = registry.manifest(stable).calibration
    assert calibration is not None and calibration.images == TEST_ROWS
    pair = paired_test_predictions(registry, stable, candidate)
    assert pair is not None
    np.testing.assert_array_equal(pair[0], stable_classes)
    assert expected_agreement(*pair, [1] * 10) == pytest.approx(0.8)


def test_a_version_registered_before_has_none(registry: Registry) -> None:
    old = register(registry, None, "old")
    new = register(registry, npy(np.zeros(TEST_ROWS, dtype=np.uint8)), "new")
    assert read_test_predictions(registry, old) is None
    assert paired_test_predictions(registry, new, old) is None
    manifest = registry.manifest(old).to_json()
    del manifest["calibration"]
    registry.store.write_bytes(join(registry.version_dir(old), "manifest.json"), json.dumps(manifest).encode())
    assert registry.manifest(old).calibration is None  # a manifest from before calibrations reads


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (npy(np.zeros(TEST_ROWS, dtype=np.int64)), r"holds int64 \(100,\), not 100 uint8 class numbers"),
        (npy(np.zeros(TEST_ROWS - 1, dtype=np.uint8)), r"holds uint8 \(99,\), not 100 uint8"),
        (npy(np.full(TEST_ROWS, 10, dtype=np.uint8)), "holds class 10; classes are 0 to 9"),
        (npy(np.array([{"a": 1}] * TEST_ROWS, dtype=object)), r"not a .npy array \(Object arrays cannot be loaded"),
        (b"not an npy file", r"not a .npy array"),
        (npy(np.zeros(TEST_ROWS * 100, dtype=np.uint8)), "10128 bytes, more than 100 test images' predictions take"),
    ],
    ids=["int64", "short", "class-10", "pickled", "garbage", "huge"],
)
def test_bad_test_predictions_are_refused_naming_the_file(registry: Registry, content: bytes, problem: str) -> None:
    version = register(registry, content, "bad")
    with pytest.raises(RegistryError, match=rf"{version}/test_predictions.npy: {problem}.*rollout abort"):
        read_test_predictions(registry, version)


def test_changed_test_predictions_and_other_test_sets_are_refused(registry: Registry) -> None:
    version = register(registry, npy(np.zeros(TEST_ROWS, dtype=np.uint8)), "changed")
    other = register(registry, npy(np.zeros(TEST_ROWS, dtype=np.uint8)), "other", test_set="test-set-b")
    location = join(registry.version_dir(version), RunLayout.TEST_PREDICTIONS)
    registry.store.write_bytes(location, npy(np.ones(TEST_ROWS, dtype=np.uint8)))
    with pytest.raises(RegistryError, match=r"test_predictions.npy: missing or changed since registration"):
        read_test_predictions(registry, version)
    with pytest.raises(RegistryError, match=r"evaluated on different test sets .* cannot be paired"):
        paired_test_predictions(registry, version, other)


@pytest.mark.parametrize(
    ("field", "value"),
    [("atc_threshold", 1.5), ("bin_accuracy", [0.5] * 3), ("precision", ["high"] * 10), ("surprise", 1)],
)
def test_a_manifest_with_a_bad_calibration_is_refused_naming_the_field(
    registry: Registry, field: str, value: object
) -> None:
    version = register(registry, None, "calibrated")
    location = join(registry.version_dir(version), "manifest.json")
    manifest = registry.manifest(version).to_json()
    manifest["calibration"][field] = value
    registry.store.write_bytes(location, json.dumps(manifest).encode())
    with pytest.raises(RegistryError, match=rf"manifest.json: the version's manifest is damaged \(calibration.{field}"):
        registry.manifest(version)
