"""Normalization and the parquet cache: exact round trip, reuse, verification, atomic writes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import idx
from fmnist.data import normalization as normalize_module
from fmnist.data.cache import PREPROCESSING_VERSION, PartCache, normalize, read_metadata, read_part, read_pixels
from fmnist.data.contract import DataValidationError
from fmnist.data.download import download_dataset
from fmnist.data.incoming import collect_incoming
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import ValidationReport, validate_raw
from fmnist.storage import IntegrityError, Store, StoredFile, join
from fmnist.storage.layout import DataLayout
from tests.helpers import synthetic_images, write_idx_batch


@pytest.fixture
def layout(data_layout: DataLayout) -> DataLayout:
    """This module's data root is on each storage backend in turn (`raw` downloads into it)."""
    return data_layout


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
    assert not cached.reused and (cached.train_rows, cached.test.rows) == (200, 50) and len(cached.train) == 1
    images, labels = read_part(store.local_copy(cached.train[0].file))
    raw_images, raw_labels = idx.read_pair(
        store.local_copy(raw.train_images.file), store.local_copy(raw.train_labels.file)
    )
    assert images.dtype == np.float32 and images.shape == (200, 28, 28)
    np.testing.assert_array_equal(images, raw_images / np.float32(255))
    np.testing.assert_array_equal(labels, raw_labels)
    pixels, uint8_labels = read_pixels(store, cached.train)
    assert pixels.dtype == np.uint8 and pixels.shape == (200, 28, 28)
    np.testing.assert_array_equal(pixels, raw_images)
    np.testing.assert_array_equal(uint8_labels, raw_labels)
    meta = read_metadata(store.local_copy(cached.test.file))
    assert meta["source"] == "canonical-test" and meta["shape"] == [50, 28, 28]
    assert meta["key"] == cached.test.path.split("/")[-2]
    assert cached.sources["canonical"] == [f.sha256 for f in raw.files]
    assert store.listdir(data_layout.cache) == ["datasets", "parts"]
    assert store.listdir(join(data_layout.cache, "datasets")) == [f"{cached.key}.json"]
    for part in (*cached.train, cached.test):
        assert store.find(part.path.rsplit("/", 1)[0]) == ["manifest.json", "part.parquet"]


def test_second_run_reuses_the_cache_without_rewriting(mirror, data_layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    first = build(spec, raw, store, data_layout)
    written = store.read_versioned(first.train[0].path)[1]
    second = build(spec, raw, Store(scratch=tmp_path / "other-host"), data_layout)
    assert second.reused and second.key == first.key and second.train == first.train
    assert store.read_versioned(first.train[0].path)[1] == written  # the same object, not written again


def test_a_new_batch_adds_one_part_and_the_others_are_not_written_again(mirror, data_layout, store, raw, tmp_path):
    _, spec = mirror
    incoming = tmp_path / "incoming"
    for n, seed in enumerate((9, 10)):
        labels = np.array([n, 8, 7], dtype=np.uint8)
        write_idx_batch(incoming / f"batch-{n}", synthetic_images(labels, seed=seed), labels)
    first = build(spec, raw, store, data_layout, collect_incoming(store, str(incoming)))
    stamps = {part.path: store.fingerprint(part.path) for part in (*first.train, first.test)}
    labels = np.array([4, 4, 5], dtype=np.uint8)
    write_idx_batch(incoming / "batch-2", synthetic_images(labels, seed=11), labels)
    second = build(spec, raw, store, data_layout, collect_incoming(store, str(incoming)))
    assert not second.reused and second.key != first.key
    assert second.train[:3] == first.train and second.test == first.test and len(second.train) == 4
    assert {path: store.fingerprint(path) for path in stamps} == stamps  # none written again
    assert len(store.listdir(join(data_layout.cache, "parts"))) == 5
    pixels, got = read_pixels(store, second.train)
    assert len(pixels) == second.train_rows == 209
    np.testing.assert_array_equal(got[-3:], labels)


def test_a_batch_renamed_reuses_its_part(mirror, data_layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    labels = np.array([1, 2, 3], dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "old-name", synthetic_images(labels, seed=4), labels)
    first = build(spec, raw, store, data_layout, collect_incoming(store, str(tmp_path / "incoming")))
    (tmp_path / "incoming" / "old-name").rename(tmp_path / "incoming" / "new-name")
    second = build(spec, raw, store, data_layout, collect_incoming(store, str(tmp_path / "incoming")))
    assert second.key != first.key and second.train == first.train
    assert second.rows_by_source == {"canonical": 200, "new-name": 3}


def test_damaged_part_is_not_a_hit_and_is_rebuilt(mirror, data_layout, store, raw) -> None:
    _, spec = mirror
    first = build(spec, raw, store, data_layout)
    data = bytearray(store.read_bytes(first.train[0].path))
    data[100:103] = b"\x00\x01\x02"
    store.write_bytes(first.train[0].path, bytes(data))
    assert PartCache(store, data_layout.cache).lookup(first.key) is None
    again = build(spec, raw, store, data_layout)
    assert not again.reused and again.train[0].sha256 == first.train[0].sha256
    assert store.local_copy(StoredFile(first.train[0].path, first.train[0].sha256))  # repaired in place


def test_a_part_edited_in_place_with_its_times_kept_is_written_again(mirror, tmp_path) -> None:
    """Same size, same modification time, same inode (`cp --preserve=timestamps` onto it): the lookup
    counted the part, and the reader's hash failed the run. The inode change time moves whatever the
    times are set to: the lookup hashes the part, and it is written again, no run failing."""
    folder, spec = mirror
    store, data_layout = Store(), DataLayout(str(tmp_path / "data"))
    raw = download_dataset(spec, [str(folder)], store, data_layout.raw)
    first = build(spec, raw, store, data_layout)
    path = Path(first.train[0].path)

    def damage() -> None:
        before = path.stat()
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        with path.open("r+b") as f:  # in place: the same inode
            f.write(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    damage()
    assert PartCache(store, data_layout.cache).lookup(first.key) is None
    again = build(spec, raw, store, data_layout)
    assert not again.reused and again.train[0].sha256 == first.train[0].sha256
    read_pixels(store, again.train)

    damage()  # and a manifest whose stamp vouches for what it did not see: the reader's hash still catches it
    manifest = Path(path.parent, "manifest.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "stamp": store.fingerprint(str(path))}))
    assert PartCache(store, data_layout.cache).lookup(first.key) is not None
    with pytest.raises(IntegrityError, match="is not the recorded"):
        read_pixels(store, first.train)
    assert not path.exists()  # unpublished: the next run writes it again


def test_a_part_stamped_before_it_settled_is_hashed_until_it_has(data_layout, store) -> None:
    """A part written a moment ago has a stamp a write in the same clock tick could keep: it is not
    recorded, the lookup hashes the file instead, and records the stamp once it has settled."""
    import time

    from fmnist.storage import SETTLE_S

    cache = PartCache(store, data_layout.cache)
    part = cache.write_part("k", np.zeros((2, 784), np.float32), np.zeros(2, np.uint8), {})
    written = cache.publish_part("k", part, "test")
    manifest = join(data_layout.cache, "parts", "k", "manifest.json")
    on_disk = store.direct_path(manifest) is not None
    assert (store.read_json(manifest)["stamp"] is None) == on_disk  # a bucket's ETag is settled at once
    assert cache.lookup_part("k") == written
    if on_disk:
        time.sleep(SETTLE_S + 0.2)
        assert cache.lookup_part("k") == written
        assert store.read_json(manifest)["stamp"] == store.fingerprint(written.path)


def test_a_cache_written_before_parts_is_rebuilt_once_and_says_so(mirror, data_layout, store, raw, caplog) -> None:
    _, spec = mirror
    key = build(spec, raw, store, data_layout).key
    store.delete(data_layout.cache)
    store.write_json(join(data_layout.cache, key, "manifest.json"), {"key": key, "splits": {}})  # the old layout
    with caplog.at_level(logging.INFO, logger="fmnist.data.normalization"):
        rebuilt = build(spec, raw, store, data_layout)
    assert rebuilt.key == key and not rebuilt.reused  # same key: the registry's versions stay current
    assert f"The cache entry {key[:16]} was written before the cache kept parts; it is rebuilt once" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fmnist.data.normalization"):
        assert build(spec, raw, store, data_layout).reused
    assert "rebuilt" not in caplog.text


def test_incoming_batches_are_appended_to_train_only(mirror, data_layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    labels = np.array([9, 8, 7], dtype=np.uint8)
    batch_images = synthetic_images(labels, seed=9)
    write_idx_batch(tmp_path / "incoming" / "extra", batch_images, labels)
    plain = build(spec, raw, store, data_layout)
    cached = build(spec, raw, store, data_layout, collect_incoming(store, str(tmp_path / "incoming")))
    assert cached.key != plain.key
    assert (cached.train_rows, cached.test.rows) == (203, 50) and cached.test == plain.test
    images, got_labels = read_part(store.local_copy(cached.train[1].file))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(images, batch_images / np.float32(255))
    assert cached.rows_by_source == {"canonical": 200, "extra": 3}
    dataset = store.read_json(join(data_layout.cache, "datasets", f"{cached.key}.json"))
    assert dataset["train_rows_by_source"] == {"canonical": 200, "extra": 3}


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
    with pytest.raises(
        DataValidationError, match=r"Normalized data failed validation:\n  - normalized-canonical-train: "
    ):
        build(spec, raw, store, data_layout)
    assert store.find(data_layout.cache) == []  # nothing cached


def test_failed_write_publishes_no_part_and_leaves_no_temp_files(data_layout, store, tmp_path) -> None:
    cache = PartCache(store, data_layout.cache)
    good = (np.zeros((2, 784), np.float32), np.zeros(2, np.uint8))
    bad = (np.zeros((2, 784), np.float64), np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="pixels must be"):
        cache.write_part("k", *bad, {})
    cache.discard("k")
    assert cache.lookup_part("k") is None and store.find(data_layout.cache) == []
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".part-") or p.suffix == ".part"]
    written = cache.write_part("k", *good, {})
    assert cache.lookup_part("k") is None  # no part until its manifest is written
    cache.publish_part("k", written, "test")
    assert cache.lookup_part("k") == written
    assert read_metadata(store.local_copy(written.file))["shape"] == [2, 28, 28]
    manifest = store.read_json(join(data_layout.cache, "parts", "k", "manifest.json"))
    assert manifest["preprocessing_version"] == PREPROCESSING_VERSION
    cache.discard("k")  # a published part stays
    assert cache.lookup_part("k") == written
