"""Normalize stage: float32 pixels in [0, 1], checked by GX, cached as parquet parts (`fmnist.data.cache`).

The training set is the canonical training split followed by the incoming batches; the test set is
always the canonical test split, so every model version is compared on the same images. Each source
becomes a part of its own, once: a run reads, normalizes, checks and writes only the sources no
earlier run made a part of, one at a time, so its memory is that of the largest source (a batch is at
most `MAX_BATCH_ROWS` images), not of the dataset.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait

from fmnist.data.cache import CachedDataset, CachedPart, PartCache, dataset_key, normalize, part_key
from fmnist.data.contract import (
    DataValidationError,
    FrameCheck,
    normalized_expectations,
    normalized_summary,
    run_checks,
)
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset
from fmnist.data.incoming import IncomingBatch, input_hashes
from fmnist.data.validation import Source, ValidationReport, sources
from fmnist.storage import Store, join
from fmnist.storage.layout import DataLayout

log = logging.getLogger(__name__)


def normalize_and_cache(
    spec: DatasetSpec,
    raw: RawDataset,
    incoming: list[IncomingBatch],
    validation: ValidationReport,
    store: Store,
    layout: DataLayout,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> CachedDataset:
    """The cached normalized dataset for these inputs: reused when present and intact, else made of the
    parts already there and the ones this call writes."""
    if not validation.success:
        raise DataValidationError(f"refusing to cache data that failed validation {validation.key}")
    cache = PartCache(store, layout.cache)
    key = dataset_key(input_hashes(raw, incoming))
    if hit := cache.lookup(key):
        return hit
    if legacy := cache.legacy_entry(key):
        logger.info(
            "The cache entry %s was written before the cache kept parts; it is rebuilt once as parts (%s can be "
            "deleted)",
            key[:16],
            legacy.removesuffix("/manifest.json"),
        )
    # The validation stage's sources, in its order (canonical train, canonical test, each batch), so each
    # part is keyed by the same content hash as its validation.
    train_source, test_source, *batches = sources(spec, raw, incoming, store)
    train = [cached_part(cache, source, layout, logger) for source in (train_source, *batches)]
    test = cached_part(cache, test_source, layout, logger)
    metadata = {
        "sources": {"canonical": [f.sha256 for f in raw.files], "incoming": {b.name: b.sha256 for b in incoming}},
        "train_rows_by_source": {"canonical": spec.train_rows, **{b.name: b.rows for b in incoming}},
    }
    return cache.publish(key, train, test, metadata)


def cached_part(
    cache: PartCache, source: Source, layout: DataLayout, logger: logging.Logger | logging.LoggerAdapter = log
) -> CachedPart:
    """The source's part: found in the cache, else read, normalized, checked and written."""
    key, name = part_key(source.content), source.suite.removeprefix("raw-")  # canonical-train, incoming-<batch>
    if part := cache.lookup_part(key):
        return part
    images, labels = source.load()
    pixels = normalize(images)
    del images
    check = FrameCheck(f"normalized-{name}", normalized_summary(pixels, labels), normalized_expectations(len(labels)))
    # The parquet file is written while GX checks the same array: the writer works outside the GIL and
    # GX mostly inside it, so on 2 cores a part takes about the longer of the two instead of their sum.
    # The file becomes a part only once the check passes; otherwise it is removed.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-writer") as writer:
        writing = writer.submit(cache.write_part, key, pixels, labels, {"source": name})
        try:
            with cache.store.staged_tree(join(layout.validation, f"normalized-{key}"), marker="result.json") as staged:
                outcomes = run_checks([check], staged)
            failures = [f"{o.suite}: {f}" for o in outcomes for f in o.failures]
            if failures:
                raise DataValidationError("Normalized data failed validation:\n  - " + "\n  - ".join(failures))
            written = writing.result()
        except BaseException:
            wait([writing])
            cache.discard(key)
            raise
    logger.info("Cache part %s written: %s, %d rows", key[:16], name, written.rows)
    return cache.publish_part(key, written, name)
