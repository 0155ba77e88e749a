"""The pipeline's stages on the real 70,000 Fashion-MNIST images (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmnist.data import idx
from fmnist.data.cache import CachedDataset, read_part
from fmnist.data.dataset import DEFAULT_MIRRORS, FASHION_MNIST
from fmnist.data.download import RawDataset, download_dataset
from fmnist.data.incoming import collect_incoming
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import validate_raw
from fmnist.evaluation.evaluate import evaluate_model
from fmnist.storage import Store
from fmnist.storage.layout import DataLayout
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams
from tests.helpers import local_run, write_idx_batch

LOCAL_MIRROR = Path(DEFAULT_MIRRORS[0])

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[RawDataset, CachedDataset]:
    if not (LOCAL_MIRROR / FASHION_MNIST.train_images.name).is_file():
        pytest.fail(
            f"the real data is missing from {LOCAL_MIRROR}: run `make data` (apt-get install dataset-fashion-mnist)"
        )
    layout, store = DataLayout(str(tmp_path_factory.mktemp("real") / "data")), Store()
    raw = download_dataset(FASHION_MNIST, [str(LOCAL_MIRROR)], store, layout.raw)
    assert {f.source for f in raw.files} == {str(LOCAL_MIRROR)}
    report = validate_raw(FASHION_MNIST, raw, [], store, layout.validation)
    assert report.success, report.suites
    assert [(s.suite, s.rows, s.evaluated) for s in report.suites] == [
        ("raw-canonical-train", 60_000, 9),
        ("raw-canonical-test", 10_000, 9),
    ]
    return raw, normalize_and_cache(FASHION_MNIST, raw, [], report, store, layout)


def test_real_data_verifies_validates_and_caches(real) -> None:
    raw, cached = real
    images, labels = read_part(Path(cached.test.path))
    raw_images, raw_labels = idx.read_pair(Path(raw.test_images.path), Path(raw.test_labels.path))
    assert images.shape == (10_000, 28, 28)
    np.testing.assert_array_equal(images, raw_images / np.float32(255))
    np.testing.assert_array_equal(labels, raw_labels)
    np.testing.assert_array_equal(np.bincount(labels), [1_000] * 10)
    train_images, train_labels = read_part(Path(cached.train[0].path))
    assert train_images.shape == (60_000, 28, 28) and 0.0 <= train_images.min() < train_images.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(train_labels), [6_000] * 10)


def test_drift_on_the_real_images(real, tmp_path: Path) -> None:
    """Test images (unseen, same distribution) pass; the same images inverted, or one class alone, do not."""
    raw, _ = real
    images, labels = idx.read_pair(Path(raw.test_images.path), Path(raw.test_labels.path))
    incoming = tmp_path / "incoming"
    write_idx_batch(incoming / "unseen", images[:500], labels[:500])
    write_idx_batch(incoming / "inverted", 255 - images[500:1000], labels[500:1000])
    sandals = 1000 + np.flatnonzero(labels[1000:] == 5)[:200]  # none of them in the other batches: a repeat is refused
    write_idx_batch(incoming / "sandals-only", images[sandals], labels[sandals])
    store = Store()
    batches = collect_incoming(store, str(incoming))
    report = validate_raw(FASHION_MNIST, raw, batches, store, str(tmp_path / "validation"))
    assert report.success
    assert sorted(o.suite for o in report.drifted) == [
        "drift-incoming-inverted",
        "drift-incoming-sandals-only",
    ]


@pytest.mark.slow
def test_reference_recipe_reaches_its_accuracy(real, tmp_path: Path) -> None:
    # One 5-epoch run of this recipe lands anywhere in 0.870-0.878 depending on the seed (9 seeds measured
    # on a 2-core CPU; another CPU's kernels round differently), so one seed would test luck as well as the
    # pipeline: take the median of the default seed and two others.
    _, cached = real
    accuracies = []
    for seed in (TrainParams().seed, 0, 1):
        run = local_run(tmp_path / f"run-{seed}")
        trained = train_model(cached, TrainParams(seed=seed), run)  # the tutorials' DNN
        evaluation = evaluate_model(trained, cached, run)
        assert trained.epochs == 5 and sum(row["support"] for row in evaluation.per_class) == 10_000
        accuracies.append(evaluation.test_accuracy)
    assert np.median(accuracies) >= 0.87, accuracies
    assert min(accuracies) >= 0.86, accuracies


@pytest.mark.slow
def test_the_tuned_mlp_beats_the_plain_mlp_references(real, tmp_path: Path) -> None:
    """`dnn-tuned`, dense layers only, at 0.900 or more (median of seeds 0, 1 and 2), selected on held-out
    training rows: the best plain-MLP results we know of are about 0.895, and above 0.92 would smell of a leak."""
    _, cached = real
    accuracies = []
    for seed in (0, 1, 2):
        run = local_run(tmp_path / f"run-{seed}")
        trained = train_model(cached, TrainParams(preset="dnn-tuned", seed=seed), run)
        assert trained.validation.rows == 6_000 and trained.validation.per_class == [600] * 10
        accuracies.append(evaluate_model(trained, cached, run).test_accuracy)
        print(f"dnn-tuned seed {seed}: test accuracy {accuracies[-1]:.4f}, {trained.epochs} epochs, ", end="")
        print(f"{trained.seconds_per_epoch * trained.epochs:.0f} s of training")
    assert np.median(accuracies) >= 0.900, accuracies
    assert max(accuracies) < 0.92, accuracies


@pytest.mark.slow
def test_the_improved_cnn_beats_the_cnn_tutorial(real, tmp_path: Path) -> None:
    """`cnn` at 0.935 or more (median of seeds 0, 1 and 2; the CNN tutorial reaches about 0.93), each in
    at most 15 minutes of training on 2 CPU cores (printed, not asserted: timings belong to benchmarks)."""
    _, cached = real
    accuracies = []
    for seed in (0, 1, 2):
        run = local_run(tmp_path / f"run-{seed}")
        trained = train_model(cached, TrainParams(preset="cnn", seed=seed), run)
        assert trained.validation.rows == 6_000
        accuracies.append(evaluate_model(trained, cached, run).test_accuracy)
        print(f"cnn seed {seed}: test accuracy {accuracies[-1]:.4f}, {trained.epochs} epochs, ", end="")
        print(f"{trained.seconds_per_epoch * trained.epochs:.0f} s of training")
    assert np.median(accuracies) >= 0.935, accuracies
