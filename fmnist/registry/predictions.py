"""A version's predicted class for each test image (`test_predictions.npy`, kept at registration), read back
for the rollout's judge: how often two versions agree on the test set is what their live agreement is held to
(`fmnist.evaluation.estimates.expected_agreement`)."""

from __future__ import annotations

import numpy as np

from fmnist.data.dataset import NUM_CLASSES
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import IntegrityError
from fmnist.storage.layout import RunLayout

NPY_HEADER_BYTES = 4096  # an .npy header's room, at most, beside one byte per test image
DECIDE_BY_HAND = "`fashion-mnist rollout promote` or `fashion-mnist rollout abort` decides the rollout by hand"


def read_test_predictions(registry: Registry, version: str) -> np.ndarray | None:
    """`version`'s predicted class of each test image, in the test set's order, checked against its manifest
    (its sha256, one uint8 class number per test image); None for a version registered before they were kept."""
    manifest = registry.manifest(version)
    if RunLayout.TEST_PREDICTIONS not in manifest.files:
        return None
    file = registry.file(version, RunLayout.TEST_PREDICTIONS)
    rows = manifest.data.test_rows

    def damaged(problem: str) -> RegistryError:
        return RegistryError(f"{file.location}: {problem}; {version}'s expected agreement is unknown: {DECIDE_BY_HAND}")

    try:
        path = registry.store.local_copy(file)
    except (FileNotFoundError, IntegrityError) as exc:
        raise damaged(f"missing or changed since registration ({exc})") from None
    if (size := path.stat().st_size) > rows + NPY_HEADER_BYTES:
        raise damaged(f"{size} bytes, more than {rows} test images' predictions take")
    try:
        predictions = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise damaged(f"not a .npy array ({exc})") from None
    if predictions.dtype != np.uint8 or predictions.shape != (rows,):
        raise damaged(f"holds {predictions.dtype} {predictions.shape}, not {rows} uint8 class numbers")
    if rows and predictions.max() >= NUM_CLASSES:
        raise damaged(f"holds class {predictions.max()}; classes are 0 to {NUM_CLASSES - 1}")
    return predictions


def paired_test_predictions(registry: Registry, stable: str, candidate: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Both versions' test predictions, on the same test set; None when either has none (registered before)."""
    stable_set, candidate_set = (registry.manifest(v).data.test_set for v in (stable, candidate))
    if stable_set != candidate_set:
        raise RegistryError(
            f"{stable} and {candidate} were evaluated on different test sets ({stable_set[:12]}, "
            f"{candidate_set[:12]}): their predictions cannot be paired; {DECIDE_BY_HAND}"
        )
    stable_predictions = read_test_predictions(registry, stable)
    candidate_predictions = read_test_predictions(registry, candidate)
    if stable_predictions is None or candidate_predictions is None:
        return None
    return stable_predictions, candidate_predictions
