"""Normalization and the parquet cache: exact round trip, reuse, verification, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fmnist import idx
from fmnist.cache import PREPROCESSING_VERSION, ParquetCache, read_metadata, read_split
from fmnist.dataset import DataLayout, DatasetSpec
from tasks.download import RawDataset, download_dataset
from tasks.incoming import collect_incoming
from tasks.normalize import normalize, normalize_and_cache
from tasks.validate import DataValidationError, ValidationReport, validate_raw
from tests.helpers import synthetic_images, write_idx_batch


@pytest.fixture
def raw(mirror: tuple[Path, DatasetSpec], layout: DataLayout) -> RawDataset:
    folder, spec = mirror
    return download_dataset(spec, [str(folder)], layout.raw)


def build(spec, raw, layout, incoming=()):
    incoming = list(incoming)
    report = validate_raw(spec, raw, incoming, layout.validation)
    return normalize_and_cache(spec, raw, incoming, report, layout.cache, layout.validation)


def test_normalize_matches_the_reference_division_for_every_pixel_value() -> None:
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    expected = (images.reshape(1, -1) / 255.0).astype(np.float32)  # the tutorials' float64 division
    got = normalize(images)
    assert got.dtype == np.float32 and got.shape == (1, 256)
    np.testing.assert_array_equal(got, expected)


def test_cache_round_trips_exactly_with_metadata(mirror, layout, raw) -> None:
    _, spec = mirror
    cached = build(spec, raw, layout)
    assert not cached.reused and (cached.train.rows, cached.test.rows) == (200, 50)
    images, labels = read_split(Path(cached.train.path))
    raw_images, raw_labels = idx.read_pair(Path(raw.train_images.path), Path(raw.train_labels.path))
    assert images.dtype == np.float32 and images.shape == (200, 28, 28)
    np.testing.assert_array_equal(images, raw_images / np.float32(255))
    np.testing.assert_array_equal(labels, raw_labels)
    meta = read_metadata(Path(cached.test.path))
    assert meta["key"] == cached.key and meta["split"] == "test" and meta["shape"] == [50, 28, 28]
    assert meta["sources"]["canonical"] == [f.sha256 for f in raw.files]
    assert Path(cached.train.path).parent == layout.cache / cached.key


def test_second_run_reuses_the_cache_without_rewriting(mirror, layout, raw) -> None:
    _, spec = mirror
    first = build(spec, raw, layout)
    mtime = os.stat(first.train.path).st_mtime_ns
    second = build(spec, raw, layout)
    assert second.reused and second.key == first.key and second.train == first.train
    assert os.stat(second.train.path).st_mtime_ns == mtime


def test_damaged_cache_entry_is_not_a_hit_and_is_rebuilt(mirror, layout, raw) -> None:
    _, spec = mirror
    first = build(spec, raw, layout)
    with open(first.train.path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert ParquetCache(layout.cache).lookup(first.key) is None
    again = build(spec, raw, layout)
    assert not again.reused and again.train.sha256 == first.train.sha256


def test_incoming_batches_are_appended_to_train_only(mirror, layout, raw, tmp_path) -> None:
    _, spec = mirror
    labels = np.array([9, 8, 7], dtype=np.uint8)
    batch_images = synthetic_images(labels, seed=9)
    write_idx_batch(tmp_path / "incoming" / "extra", batch_images, labels)
    plain = build(spec, raw, layout)
    cached = build(spec, raw, layout, collect_incoming(tmp_path / "incoming"))
    assert cached.key != plain.key
    assert (cached.train.rows, cached.test.rows) == (203, 50)
    images, got_labels = read_split(Path(cached.train.path))
    np.testing.assert_array_equal(got_labels[-3:], labels)
    np.testing.assert_array_equal(images[-3:], batch_images / np.float32(255))
    assert read_metadata(Path(cached.train.path))["train_rows_by_source"] == {"canonical": 200, "extra": 3}


def test_refuses_data_that_failed_validation(mirror, layout, raw) -> None:
    _, spec = mirror
    failed = ValidationReport(key="k", success=False, result_path="r", docs_index="d", suites=[])
    with pytest.raises(DataValidationError, match="refusing to cache data that failed validation k"):
        normalize_and_cache(spec, raw, [], failed, layout.cache, layout.validation)
    assert not layout.cache.exists()


def test_failed_write_leaves_no_entry_and_no_temp_files(tmp_path) -> None:
    cache = ParquetCache(tmp_path / "cache")
    good = (np.zeros((2, 784), np.float32), np.zeros(2, np.uint8))
    bad = (np.zeros((2, 784), np.float64), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="pixels must be"):
        cache.store("k", {"train": good, "test": bad}, {})
    assert list((tmp_path / "cache").iterdir()) == []
    stored = cache.store("k", {"train": good, "test": good}, {})
    assert cache.lookup("k") == stored.__class__(**{**vars(stored), "reused": True})
    assert read_metadata(Path(stored.train.path))["shape"] == [2, 28, 28]
    assert PREPROCESSING_VERSION in (tmp_path / "cache" / "k" / "manifest.json").read_text()
