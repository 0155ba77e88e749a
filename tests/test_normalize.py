"""Normalization and the parquet cache: exact round trip, reuse, verification, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmnist.data import idx
from fmnist.data import normalization as normalize_module
from fmnist.data.cache import PREPROCESSING_VERSION, ParquetCache, normalize, read_metadata, read_split
from fmnist.data.contract import DataValidationError
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset, download_dataset
from fmnist.data.incoming import collect_incoming
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import ValidationReport, validate_raw
from fmnist.storage import Store, StoredFile, join
from fmnist.storage.layout import DataLayout
from tests.helpers import synthetic_images, write_idx_batch


@pytest.fixture
def raw(mirror: tuple[Path, DatasetSpec], data_layout: DataLayout, store: Store) -> RawDataset:
    folder, spec = mirror
    return download_dataset(spec, [str(folder)], store, data_layout.raw)


def build(spec, raw, store, layout, incoming=()):
    incoming = list(incoming)
    report = validate_raw(spec, raw, incoming, store, layout.validation)
    return normalize_and_cache(spec, raw, incoming, report, store, layout)


def test_normalize_matches_the_reference_division_for_every_pixel_value() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    expected = (images.reshape(1, -1) / 255.0).astype(np.float32)  # the tutorials' float64 division
    got = normalize(images)
    assert got.dtype == np.float32 and got.shape == (1, 256)
    np.testing.assert_array_equal(got, expected)


def test_cache_round_trips_exactly_with_metadata(mirror, data_layout, store, raw) -> None:
    _, spec = mirror
    cached = build(spec, raw, store, data_layout)
    assert not cached.reused and (cached.train.rows, cached.test.rows) == (200, 50)
    images, labels = read_split(store.local_copy(cached.train.file))
    raw_images, raw_labels = idx.read_pair(
        store.local_copy(raw.train_images.file), store.local_copy(raw.train_labels.file)
    )
    assert images.dtype == np.float32 and images.shape == (200, 28, 28)
    np.testing.assert_array_equal(images, raw_images / np.float32(255))
    np.testing.assert_array_equal(labels, raw_labels)
    meta = read_metadata(store.local_copy(cached.test.file))
    assert meta["key"] == cached.key and meta["split"] == "test" and meta["shape"] == [50, 28, 28]
    assert meta["sources"]["canonical"] == [f.sha256 for f in raw.files] == cached.sources["canonical"]
    assert cached.train.path == join(data_layout.cache, cached.key, "train.parquet")
    assert store.find(join(data_layout.cache, cached.key)) == ["manifest.json", "test.parquet", "train.parquet"]


def test_second_run_reuses_the_cache_without_rewriting(mirror, data_layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    first = build(spec, raw, store, data_layout)
    written = store.read_versioned(first.train.path)[1]
    second = build(spec, raw, Store(scratch=tmp_path / "other-host"), data_layout)
    assert second.reused and second.key == first.key and second.train == first.train
    assert store.read_versioned(first.train.path)[1] == written  # the same object, not written again


def test_damaged_cache_entry_is_not_a_hit_and_is_rebuilt(mirror, data_layout, store, raw) -> None:
    _, spec = mirror
    first = build(spec, raw, store, data_layout)
    data = bytearray(store.read_bytes(first.train.path))
    data[100:103] = b"\x00\x01\x02"
    store.write_bytes(first.train.path, bytes(data))
    assert ParquetCache(store, data_layout.cache).lookup(first.key) is None
    again = build(spec, raw, store, data_layout)
    assert not again.reused and again.train.sha256 == first.train.sha256
    assert store.local_copy(StoredFile(first.train.path, first.train.sha256))  # repaired in place


def test_incoming_batches_are_appended_to_train_only(mirror, data_layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    labels = np.array([9, 8, 7], dtype=np.uint8)
    batch_images = synthetic_images(labels, seed=9)
    write_idx_batch(tmp_path / "incoming" / "extra", batch_images, labels)
    plain = build(spec, raw, store, data_layout)
    cached = build(spec, raw, store, data_layout, collect_incoming(store, str(tmp_path / "incoming")))
    assert cached.key != plain.key
    assert (cached.train.rows, cached.test.rows) == (203, 50)
    images, got_labels = read_split(store.local_copy(cached.train.file))
    np.testing.assert_array_equal(got_labels[-3:], labels)
    np.testing.assert_array_equal(images[-3:], batch_images / np.float32(255))
    meta = read_metadata(store.local_copy(cached.train.file))
    assert meta["train_rows_by_source"] == {"canonical": 200, "extra": 3}


def test_refuses_data_that_failed_validation(mirror, data_layout, store, raw) -> None:
    _, spec = mirror
    failed = ValidationReport(key="k", success=False, result_path="r", docs_index="d", suites=[])
    with pytest.raises(DataValidationError, match="refusing to cache data that failed validation k"):
        normalize_and_cache(spec, raw, [], failed, store, data_layout)
    assert store.find(data_layout.cache) == []


def test_a_normalization_bug_is_caught_by_the_normalized_suite(mirror, data_layout, store, raw, monkeypatch) -> None:
    """The second contract is a safety net under normalize(): pixels that skipped the division fail it."""
    _, spec = mirror

    def forgot_the_division(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32)

    monkeypatch.setattr(normalize_module, "normalize", forgot_the_division)
    with pytest.raises(DataValidationError, match=r"Normalized data failed validation:\n  - normalized-train: "):
        build(spec, raw, store, data_layout)
    assert store.find(data_layout.cache) == []  # nothing cached


def test_failed_write_publishes_no_entry_and_leaves_no_temp_files(data_layout, store, tmp_path) -> None:
    cache = ParquetCache(store, data_layout.cache)
    good = (np.zeros((2, 784), np.float32), np.zeros(2, np.uint8))
    bad = (np.zeros((2, 784), np.float64), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="pixels must be"):
        cache.store_entry("k", {"train": good, "test": bad}, {})
    assert cache.lookup("k") is None and not store.exists(join(data_layout.cache, "k", "manifest.json"))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".part-") or p.suffix == ".part"]
    stored = cache.store_entry("k", {"train": good, "test": good}, {})
    assert cache.lookup("k") == stored.__class__(**{**vars(stored), "reused": True})
    assert read_metadata(store.local_copy(stored.train.file))["shape"] == [2, 28, 28]
    assert (
        store.read_json(join(data_layout.cache, "k", "manifest.json"))["preprocessing_version"] == PREPROCESSING_VERSION
    )
