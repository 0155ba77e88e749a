"""The data stages on the real 70,000 Fashion-MNIST images (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmnist import idx
from fmnist.cache import read_split
from fmnist.dataset import DEFAULT_MIRRORS, FASHION_MNIST, DataLayout
from tasks.download import download_dataset
from tasks.normalize import normalize_and_cache
from tasks.validate import validate_raw

LOCAL_MIRROR = Path(DEFAULT_MIRRORS[0])

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def local_mirror() -> Path:
    if not (LOCAL_MIRROR / FASHION_MNIST.train_images.name).is_file():
        pytest.fail(
            f"the real data is missing from {LOCAL_MIRROR}: run `make data` (apt-get install dataset-fashion-mnist)"
        )
    return LOCAL_MIRROR


def test_real_data_verifies_validates_and_caches(local_mirror: Path, tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "data")
    raw = download_dataset(FASHION_MNIST, [str(local_mirror)], layout.raw)
    assert {f.source for f in raw.files} == {str(local_mirror)}

    report = validate_raw(FASHION_MNIST, raw, [], layout.validation)
    assert report.success, report.suites
    assert [(s.suite, s.rows, s.evaluated) for s in report.suites] == [
        ("raw-canonical-train", 60_000, 9),
        ("raw-canonical-test", 10_000, 9),
    ]

    cached = normalize_and_cache(FASHION_MNIST, raw, [], report, layout.cache, layout.validation)
    images, labels = read_split(Path(cached.test.path))
    raw_images, raw_labels = idx.read_pair(Path(raw.test_images.path), Path(raw.test_labels.path))
    assert images.shape == (10_000, 28, 28)
    np.testing.assert_array_equal(images, raw_images / np.float32(255))
    np.testing.assert_array_equal(labels, raw_labels)
    np.testing.assert_array_equal(np.bincount(labels), [1_000] * 10)
    train_images, train_labels = read_split(Path(cached.train.path))
    assert train_images.shape == (60_000, 28, 28) and 0.0 <= train_images.min() < train_images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(train_labels), [6_000] * 10)
