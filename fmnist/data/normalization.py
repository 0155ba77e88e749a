"""Normalize stage: float32 pixels in [0, 1], checked by GX, cached as parquet (`fmnist.data.cache`).

The training split is the canonical training set followed by the incoming batches; the test
split is always the canonical test set, so every model version is compared on the same images.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from fmnist.data import idx
from fmnist.data.cache import CachedDataset, ParquetCache, cache_key, normalize
from fmnist.data.contract import (
    DataValidationError,
    FrameCheck,
    normalized_expectations,
    normalized_summary,
    run_checks,
)
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset
from fmnist.data.incoming import IncomingBatch, input_hashes, load_collected
from fmnist.data.validation import ValidationReport
from fmnist.storage import Store, join
from fmnist.storage.layout import DataLayout


def normalize_and_cache(
    spec: DatasetSpec,
    raw: RawDataset,
    incoming: list[IncomingBatch],
    validation: ValidationReport,
    store: Store,
    layout: DataLayout,
) -> CachedDataset:
    """The cached normalized dataset for these inputs: reused when present and intact, else built."""
    if not validation.success:
        raise DataValidationError(f"refusing to cache data that failed validation {validation.key}")
    hashes = input_hashes(raw, incoming)
    cache = ParquetCache(store, layout.cache)
    key = cache_key(hashes)
    if hit := cache.lookup(key):
        return hit
    train_parts = [idx.read_pair(store.local_copy(raw.train_images.file), store.local_copy(raw.train_labels.file))]
    train_parts += [load_collected(store, batch) for batch in incoming]
    test_images, test_labels = idx.read_pair(
        store.local_copy(raw.test_images.file), store.local_copy(raw.test_labels.file)
    )
    splits = {
        "train": (
            normalize(np.concatenate([images for images, _ in train_parts])),
            np.concatenate([labels for _, labels in train_parts]),
        ),
        "test": (normalize(test_images), test_labels),
    }
    checks = [
        FrameCheck(f"normalized-{name}", normalized_summary(pixels, labels), normalized_expectations(len(labels)))
        for name, (pixels, labels) in splits.items()
    ]
    metadata = {
        "sources": {"canonical": [f.sha256 for f in raw.files], "incoming": {b.name: b.sha256 for b in incoming}},
        "train_rows_by_source": {"canonical": spec.train_rows, **{b.name: b.rows for b in incoming}},
    }
    # The parquet files are written while GX checks the same arrays: the writer works outside the GIL and
    # GX mostly inside it, so on 2 cores the stage takes about the longer of the two instead of their sum.
    # The files become a cache entry only once the checks pass; otherwise they are removed.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer") as writer:
        writing = writer.submit(cache.write_splits, key, splits, metadata)
        try:
            with store.staged_tree(join(layout.validation, f"normalized-{key}"), marker="result.json") as staged:
                outcomes = run_checks(checks, staged)
            failures = [f"{o.suite}: {f}" for o in outcomes for f in o.failures]
            if failures:
                raise DataValidationError("Normalized data failed validation:\n  - " + "\n  - ".join(failures))
            written = writing.result()
        except BaseException:
            wait([writing])
            cache.discard(key)
            raise
    return cache.publish(key, written, metadata)
