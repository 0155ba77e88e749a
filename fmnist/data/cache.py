"""The parquet cache of normalized data: the one place that knows its locations, format and metadata.

The cache holds *parts* and the *datasets* made of them. A part is one source normalized: the
canonical training split, the canonical test split, or one incoming batch. It is keyed by its
source's content and `PREPROCESSING_VERSION`, not by the run, so a batch is normalized, checked and
written once, whatever runs use it: `<cache>/parts/<key>/` holds `part.parquet` and a `manifest.json`
with its rows, sha256 and stamp (`Store.fingerprint`), written last: a part without its manifest does
not exist. A dataset is `<cache>/datasets/<key>.json`: its training parts in order (the canonical
split, then each batch) and its test part. A run that adds one batch writes one part and one dataset
file, whatever the size of the rest.

A lookup counts a part only if its manifest is there and the part file still has the stamp recorded
when it was written, which costs one listing (`Store.stamp`: on disk it includes the inode change time,
which no copy or `touch` can set back). A stamp is recorded only once settled; a part without one that
vouches is hashed instead, and counts if it still holds its recorded content. Whoever reads a part
verifies its sha256 as it reads (`verified_path`), and a part that fails is removed so the next run
writes it again.

Each part file has two columns, `image` (fixed-size list of 784 float32 pixels in [0, 1]) and `label`
(uint8), and carries its key, source and shape in the schema metadata. Pixels are dictionary-encoded
(a normalized 8-bit image has at most 256 distinct values) and zstd-compressed: the canonical training
split takes 454 bytes an image, against 784 for its uint8 pixels and 3,136 for plain float32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.storage import IntegrityError, Store, StoredFile, join
from fmnist.storage.files import sha256_file, sha256_text

log = logging.getLogger(__name__)
# Bump when what normalization produces changes: parts and datasets of other versions are not reused.
PREPROCESSING_VERSION = "1"
METADATA_KEY = b"fashion_mnist"
PIXELS = IMAGE_SIZE * IMAGE_SIZE
ROW_GROUP_ROWS = 16_384
# Rows a reader decodes at a time: reading a 60,000-image part 1,024 rows at a time peaked 110 MB above
# its uint8 result, and took 0.9 s; a row group at a time (16,384) peaked 430 MB above it and took 1.7 s.
READ_ROWS = 1_024
PART_FILE = "part.parquet"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CachedPart:
    path: str  # a location in the store: a local path or an s3:// URL
    rows: int
    sha256: str

    @property
    def file(self) -> StoredFile:
        return StoredFile(self.path, self.sha256)


@dataclass(frozen=True)
class CachedDataset:
    """What training needs to find the data: small, and the same on every host of the run."""

    key: str
    train: list[CachedPart]  # the canonical training split's part, then each incoming batch's
    test: CachedPart
    sources: dict  # the content hashes it was made from: {"canonical": [...], "incoming": {batch: hash}}
    rows_by_source: dict[str, int] = field(default_factory=dict)  # training rows: canonical, then each batch
    reused: bool = False

    @property
    def train_rows(self) -> int:
        return sum(part.rows for part in self.train)


def normalize(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 -> (n, 784) float32 in [0, 1]; bit-identical to the tutorials' x / 255.0.

    The one place the scaling is written: the cache, the CLI and any server use it, never their own.
    """
    pixels = images.reshape(len(images), -1).astype(np.float32)
    pixels /= np.float32(255)
    return pixels


# What `normalize` makes of each pixel value: a uint8 image's normalized pixels are `SCALED[image]`.
SCALED = normalize(np.arange(256, dtype=np.uint8).reshape(1, 16, 16)).reshape(256)


def pixels_of(normalized: np.ndarray) -> np.ndarray:
    """The uint8 pixels that `normalize` made `normalized` from (exactly: each value is k / 255)."""
    return np.rint(normalized * np.float32(255)).astype(np.uint8)


def dataset_key(source_hashes: list[str]) -> str:
    """The dataset's key, over all its sources (the same formula as the one-entry cache before parts, so
    a registry's versions stay current across the change)."""
    return sha256_text("normalized", PREPROCESSING_VERSION, *source_hashes)


def part_key(source_hash: str) -> str:
    return sha256_text("normalized-part", PREPROCESSING_VERSION, source_hash)


def to_table(pixels: np.ndarray, labels: np.ndarray, metadata: dict) -> pa.Table:
    """(n, 784) float32 pixels and (n,) uint8 labels as a table; no copy of the pixels."""
    if pixels.dtype != np.float32 or pixels.ndim != 2 or pixels.shape[1] != PIXELS:
        raise ValueError(f"pixels must be (n, {PIXELS}) float32, got {pixels.shape} {pixels.dtype}")
    if labels.shape != (len(pixels),):
        raise ValueError(f"{len(labels)} labels for {len(pixels)} images")
    image = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), PIXELS)
    table = pa.table({"image": image, "label": pa.array(labels, type=pa.uint8())})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def write_part_file(path: Path, pixels: np.ndarray, labels: np.ndarray, metadata: dict) -> None:
    pq.write_table(
        to_table(pixels, labels, metadata),
        path,
        compression="zstd",
        use_dictionary=["image.list.element"],
        row_group_size=ROW_GROUP_ROWS,
    )


def iter_part(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A part file's (n, 784) float32 pixels and (n,) uint8 labels, `READ_ROWS` rows at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=["image", "label"], use_threads=False):
        pixels = batch.column("image").flatten().to_numpy().reshape(-1, PIXELS)
        yield pixels, batch.column("label").to_numpy()


def read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) float32 images in [0, 1] and (n,) uint8 labels: for a part small enough to hold
    as float32 (the test split); training reads `read_pixels`."""
    table = pq.read_table(path)
    pixels = table.column("image").combine_chunks().flatten().to_numpy()
    labels = table.column("label").to_numpy()
    return pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE), labels


def read_metadata(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


class PartCache:
    def __init__(self, store: Store, root: str) -> None:
        self.store = store
        self.root = root

    def part_dir(self, key: str) -> str:
        return join(self.root, "parts", key)

    def dataset_file(self, key: str) -> str:
        return join(self.root, "datasets", f"{key}.json")

    def lookup_part(self, key: str) -> CachedPart | None:
        """The part for `key` if its manifest is there and its file is as it was written, else None.

        The manifest's stamp vouches for the file while the file still has it (one listing). A file
        without a stamp that vouches (written less than `SETTLE_S` before it was stamped, or changed
        since: by a restore, a copy, an edit) is hashed: if it still holds the recorded content, it is
        the part, and its settled stamp is recorded for the next lookup; if not, it is no part.
        """
        location = join(self.part_dir(key), MANIFEST)
        try:
            manifest = self.store.read_json(location)
            # Where this cache is now, not where the manifest says it was written: a data root may move.
            part = CachedPart(join(self.part_dir(key), PART_FILE), int(manifest["rows"]), manifest["sha256"])
            recorded = manifest["stamp"]
        except (FileNotFoundError, IntegrityError, KeyError, TypeError, ValueError):
            return None  # a store that fails (unreachable, access denied) raises: that is no cache miss
        stamp = self.store.stamp(part.path)
        if stamp is None:
            return None
        if recorded is not None and stamp.digest == recorded:
            return part
        try:
            self.store.local_copy(part.file)  # hashed (in a bucket, the copy training reads)
        except (FileNotFoundError, IntegrityError):
            log.info("Cache part %s no longer holds what its manifest records: written again", self.part_dir(key))
            return None
        if stamp.settled and self.store.fingerprint(part.path) == stamp.digest:
            self.store.write_json(location, {**manifest, "stamp": stamp.digest})
        return part

    def lookup(self, key: str) -> CachedDataset | None:
        """The dataset for `key` if its file is there and each of its parts is (see `lookup_part`)."""
        try:
            manifest = self.store.read_json(self.dataset_file(key))
            train = [self.lookup_part(k) for k in manifest["train_parts"]]
            test = self.lookup_part(manifest["test_part"])
            sources, rows_by_source = manifest["sources"], manifest["train_rows_by_source"]
        except (FileNotFoundError, IntegrityError, KeyError, TypeError):
            return None
        if test is None or None in train:
            return None
        return CachedDataset(key, train, test, sources, rows_by_source, reused=True)

    def legacy_entry(self, key: str) -> str | None:
        """Where the cache written before parts (one folder of whole splits per key) kept `key`, if it did."""
        manifest = join(self.root, key, MANIFEST)
        return manifest if self.store.exists(manifest) else None

    def write_part(self, key: str, pixels: np.ndarray, labels: np.ndarray, metadata: dict) -> CachedPart:
        """Write `key`'s part file (whole). It is no part until `publish_part`; `discard` removes it."""
        location = join(self.part_dir(key), PART_FILE)
        with self.store.staged(location) as tmp:
            write_part_file(
                tmp, pixels, labels, {**metadata, "key": key, "shape": [len(labels), IMAGE_SIZE, IMAGE_SIZE]}
            )
            digest = sha256_file(tmp)
        return CachedPart(location, len(labels), digest)

    def publish_part(self, key: str, part: CachedPart, source: str) -> CachedPart:
        """Make the written file `key`'s part: its manifest, with the file's stamp if it is settled (None
        if not: the next lookup hashes the file and records it), written last."""
        stamp = self.store.stamp(part.path)
        manifest = {
            "key": key,
            "preprocessing_version": PREPROCESSING_VERSION,
            "source": source,
            **vars(part),
            "stamp": stamp.digest if stamp and stamp.settled else None,
        }
        self.store.write_json(join(self.part_dir(key), MANIFEST), manifest)
        return part

    def discard(self, key: str) -> None:
        """Remove what `write_part` wrote for `key`, unless it has become a part."""
        if not self.store.exists(join(self.part_dir(key), MANIFEST)):
            self.store.delete(self.part_dir(key))

    def publish(self, key: str, train: list[CachedPart], test: CachedPart, metadata: dict) -> CachedDataset:
        """Write the dataset file naming its parts (each already published)."""
        manifest = {
            "key": key,
            "preprocessing_version": PREPROCESSING_VERSION,
            **metadata,
            "train_parts": [_key_of(part) for part in train],
            "test_part": _key_of(test),
        }
        self.store.write_json(self.dataset_file(key), manifest)
        return CachedDataset(key, train, test, metadata["sources"], metadata["train_rows_by_source"])


def _key_of(part: CachedPart) -> str:
    return part.path.rsplit("/", 2)[-2]


TENSOR_ALIGNMENT = 64  # what TensorFlow requires of memory it takes without a copy (`fast_fit.as_tensor`)


def aligned_empty(size: int) -> np.ndarray:
    """An uninitialised uint8 array of `size` bytes starting at a `TENSOR_ALIGNMENT` boundary."""
    buffer = np.empty(size + TENSOR_ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % TENSOR_ALIGNMENT
    return buffer[start : start + size]


def verified_path(store: Store, part: CachedPart) -> Path:
    """A local file with the part's verified content (`Store.local_copy`). A part whose file no longer
    hashes right is unpublished, so the next run that needs it writes it again, and IntegrityError raised."""
    try:
        return store.local_copy(part.file)
    except IntegrityError:
        folder = part.path.removesuffix("/" + PART_FILE)
        log.warning("Cache part %s does not hash to its manifest's sha256: removed; the next run rebuilds it", folder)
        store.delete(folder)
        raise


def read_pixels(store: Store, parts: list[CachedPart]) -> tuple[np.ndarray, np.ndarray]:
    """The parts' images as one (n, 28, 28) uint8 array (a quarter of their float32 size) and their (n,)
    labels, read `READ_ROWS` at a time: the only copy of the pixels a reader holds. Each part's file
    is verified first (`verified_path`).
    """
    images = aligned_empty(sum(p.rows for p in parts) * PIXELS).reshape(-1, PIXELS)
    labels = np.empty(len(images), np.uint8)
    row = 0
    for part in parts:
        for pixels, part_labels in iter_part(verified_path(store, part)):
            images[row : row + len(pixels)] = pixels_of(pixels)
            labels[row : row + len(pixels)] = part_labels
            row += len(pixels)
    if row != len(images):
        raise IntegrityError(f"the parts hold {row:,} rows, their manifests {len(images):,}")
    return images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE), labels
