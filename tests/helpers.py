"""Small generated datasets and mirrors, so tests need neither the network nor the real data."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fmnist.data.dataset import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, DatasetSpec, RemoteFile
from fmnist.data.idx import encode_idx
from fmnist.registry.gate import PromotionParams
from fmnist.registry.manifest import Decision, RunManifest, VersionManifest
from fmnist.storage.layout import RunLayout

ROOT = Path(__file__).resolve().parent.parent  # the repository


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Noisy images with a bright band whose position encodes the label: learnable, and 28x28 uint8."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 7, 3:25] = 255
    return images


def balanced_labels(per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES, dtype=np.uint8), per_class))


def write_mirror(folder: Path, train_per_class: int = 20, test_per_class: int = 5, seed: int = 0) -> DatasetSpec:
    """Write the four .gz files of a small balanced dataset into `folder`; return its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = balanced_labels(train_per_class, seed)
    test_labels = balanced_labels(test_per_class, seed + 1)
    arrays = {
        "train-images-idx3-ubyte.gz": synthetic_images(train_labels, seed),
        "train-labels-idx1-ubyte.gz": train_labels,
        "t10k-images-idx3-ubyte.gz": synthetic_images(test_labels, seed + 1),
        "t10k-labels-idx1-ubyte.gz": test_labels,
    }
    files = []
    for name, array in arrays.items():
        raw = encode_idx(array)
        (folder / name).write_bytes(gzip.compress(raw, mtime=0))
        files.append(RemoteFile(name=name, raw_size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    return DatasetSpec(
        train_images=files[0],
        train_labels=files[1],
        test_images=files[2],
        test_labels=files[3],
        train_rows=len(train_labels),
        test_rows=len(test_labels),
    )


def write_idx_batch(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """An incoming batch in IDX form."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batch-images-idx3-ubyte.gz").write_bytes(gzip.compress(encode_idx(images)))
    (folder / "batch-labels-idx1-ubyte.gz").write_bytes(gzip.compress(encode_idx(labels)))
    return folder


def cached_dataset(
    root: Path | str,
    train: tuple[np.ndarray, np.ndarray] | list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    store=None,
):
    """A cached dataset under `root` (a folder or an s3:// URL) of the uint8 images and labels, normalized:
    `train` as one part, or as a list of parts."""
    from fmnist.data.cache import PartCache, normalize
    from fmnist.storage import Store

    cache = PartCache(store or Store(), str(root))

    def part(name: str, images: np.ndarray, labels: np.ndarray):
        key = hashlib.sha256(f"{root!r} {name}".encode()).hexdigest()
        return cache.publish_part(key, cache.write_part(key, normalize(images), labels, {}), name)

    parts = [part(f"train-{n}", *p) for n, p in enumerate(train if isinstance(train, list) else [train])]
    key = hashlib.sha256(repr(root).encode()).hexdigest()
    return cache.publish(key, parts, part("test", *test), {"sources": {}, "train_rows_by_source": {}})


def learnable_cache(root: Path | str, train_per_class: int = 50, test_per_class: int = 10, store=None):
    train_labels = balanced_labels(train_per_class, seed=0)
    test_labels = balanced_labels(test_per_class, seed=1)
    return cached_dataset(
        root,
        (synthetic_images(train_labels, seed=0), train_labels),
        (synthetic_images(test_labels, seed=1), test_labels),
        store,
    )


def local_run(folder: Path):
    """A run folder on local disk (no scratch folder needed)."""
    from fmnist.storage import Store
    from fmnist.training.run_folder import RunFolder

    return RunFolder(Store(), RunLayout(str(folder)))


GATE = PromotionParams(min_accuracy=0.8, tolerance=0.005)  # the tests' gate: a floor of 0.8, half a point below


def run_manifest(
    accuracy: float, test_set: str = "test-set-a", run: str = "run", fingerprint: str = "fp"
) -> RunManifest:
    """A complete manifest of a run whose model scored `accuracy` on the test set `test_set`."""
    per_class = [
        {"class": name, "precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 10}
        for name in CLASS_NAMES
    ]
    return RunManifest.model_validate(
        {
            "fingerprint": fingerprint,
            "flow_run_id": run,
            "data": {
                "cache_key": "k" * 64,
                "test_set": test_set,
                "train_rows": 200,
                "test_rows": 100,
                "train_parts_sha256": ["a" * 64],
                "test_parquet_sha256": "b" * 64,
                "sources": {"canonical": ["c" * 64] * 4},
                "train_rows_by_source": {"canonical": 200},
            },
            "params": {"preset": "dnn"},
            "code": {"sha256": "d" * 64},
            "libraries": {"tensorflow": "2.x", "keras": "3.x"},
            "hardware": {"device": "CPU", "mixed_precision": False},
            "training": {"epochs": 1, "seconds_per_epoch": 1.0},
            "metrics": {
                "test_accuracy": accuracy,
                "test_loss": 0.5,
                "train_accuracy": accuracy,
                "train_loss": 0.5,
                "train_test_gap": 0.0,
            },
            "per_class": per_class,
        }
    )


def version_manifest(version: str, accuracy: float, test_set: str = "test-set-a") -> VersionManifest:
    """The manifest of a registered version `version` (one that passed the gate) scoring `accuracy`."""
    gate = Decision(True, "passed", accuracy, None, None, 0.8, 0.005)
    return VersionManifest.model_validate(
        {**run_manifest(accuracy, test_set).to_json(), "version": version, "registered_at": "now", "gate": asdict(gate)}
    )


def unix_socket(path: Path) -> None:
    """A Unix socket's file at `path`: bound in a short folder, then moved there (a socket's path may hold only
    107 bytes, and a test's folders are longer)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        with socket.socket(socket.AF_UNIX) as bound:  # (its file stays once it is closed)
            bound.bind(f"{short}/s")
        os.replace(f"{short}/s", path)
