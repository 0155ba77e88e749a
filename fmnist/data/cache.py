"""The parquet cache of normalized data: the one place that knows its locations, format and metadata.

An entry is a folder named by its content key, holding `train.parquet`, `test.parquet` and a
`manifest.json` with each file's sha256, written last: an entry without its manifest does not exist.
A lookup counts as a hit only if the manifest is there and every file still hashes to it. Entries
live in a `Store`, on local disk or in an S3 bucket alike.

Each parquet file has two columns, `image` (fixed-size list of 784 float32 pixels in [0, 1]) and
`label` (uint8), and carries its key, sources and shape in the schema metadata. Pixels are
dictionary-encoded (a normalized 8-bit image has at most 256 distinct values) and zstd-compressed:
25 MB for the training split instead of 179 MB plain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.storage import IntegrityError, Store, StoredFile, join
from fmnist.storage.files import sha256_file, sha256_text

# Bump when what normalization produces changes: entries of other versions are not reused.
PREPROCESSING_VERSION = "1"
METADATA_KEY = b"fashion_mnist"
SPLITS = ("train", "test")
PIXELS = IMAGE_SIZE * IMAGE_SIZE


@dataclass(frozen=True)
class CachedSplit:
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
    train: CachedSplit
    test: CachedSplit
    sources: dict  # the content hashes it was made from: {"canonical": [...], "incoming": {batch: hash}}
    rows_by_source: dict[str, int] = field(default_factory=dict)  # training rows: canonical, then each batch
    reused: bool = False


def normalize(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 -> (n, 784) float32 in [0, 1]; bit-identical to the tutorials' x / 255.0.

    The one place the scaling is written: the cache, the CLI and any server use it, never their own.
    """
    pixels = images.reshape(len(images), -1).astype(np.float32)
    pixels /= np.float32(255)
    return pixels


def pixels_of(normalized: np.ndarray) -> np.ndarray:
    """The uint8 pixels that `normalize` made `normalized` from (exactly: each value is k / 255)."""
    return np.rint(normalized * np.float32(255)).astype(np.uint8)


def cache_key(source_hashes: list[str]) -> str:
    return sha256_text("normalized", PREPROCESSING_VERSION, *source_hashes)


def to_table(pixels: np.ndarray, labels: np.ndarray, metadata: dict) -> pa.Table:
    """(n, 784) float32 pixels and (n,) uint8 labels as a table; no copy of the pixels."""
    if pixels.dtype != np.float32 or pixels.ndim != 2 or pixels.shape[1] != PIXELS:
        raise ValueError(f"pixels must be (n, {PIXELS}) float32, got {pixels.shape} {pixels.dtype}")
    if labels.shape != (len(pixels),):
        raise ValueError(f"{len(labels)} labels for {len(pixels)} images")
    image = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), PIXELS)
    table = pa.table({"image": image, "label": pa.array(labels, type=pa.uint8())})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def write_split(path: Path, pixels: np.ndarray, labels: np.ndarray, metadata: dict) -> None:
    pq.write_table(
        to_table(pixels, labels, metadata),
        path,
        compression="zstd",
        use_dictionary=["image.list.element"],
        row_group_size=16_384,
    )


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) float32 images in [0, 1] and (n,) uint8 labels."""
    table = pq.read_table(path)
    pixels = table.column("image").combine_chunks().flatten().to_numpy()
    labels = table.column("label").to_numpy()
    return pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE), labels


def read_metadata(path: Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[METADATA_KEY])


class ParquetCache:
    def __init__(self, store: Store, root: str) -> None:
        self.store = store
        self.root = root

    def entry(self, key: str) -> str:
        return join(self.root, key)

    def lookup(self, key: str) -> CachedDataset | None:
        """The entry for `key` if it is complete and every file verifies, else None."""
        try:
            manifest = self.store.read_json(join(self.entry(key), "manifest.json"))
            splits = {name: CachedSplit(**manifest["splits"][name]) for name in SPLITS}
            for split in splits.values():
                self.store.local_copy(split.file)
        except (FileNotFoundError, IntegrityError, KeyError, TypeError):
            return None  # a store that fails (unreachable, access denied) raises: that is no cache miss
        return CachedDataset(
            key=key,
            sources=manifest.get("sources", {}),
            rows_by_source=manifest.get("train_rows_by_source", {}),
            reused=True,
            **splits,
        )

    def store_entry(self, key: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], metadata: dict) -> CachedDataset:
        """Write every split, then publish the entry by writing its manifest; a failure publishes nothing."""
        return self.publish(key, self.write_splits(key, splits, metadata), metadata)

    def write_splits(
        self, key: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], metadata: dict
    ) -> dict[str, CachedSplit]:
        """Write each split's parquet file (whole) into `key`'s entry. They are no entry until `publish`
        writes its manifest, and `discard` removes them."""
        written = {}
        for name in SPLITS:
            pixels, labels = splits[name]
            location = join(self.entry(key), f"{name}.parquet")
            with self.store.staged(location) as tmp:
                write_split(
                    tmp,
                    pixels,
                    labels,
                    {**metadata, "key": key, "split": name, "shape": [len(labels), IMAGE_SIZE, IMAGE_SIZE]},
                )
                digest = sha256_file(tmp)
            written[name] = CachedSplit(location, len(labels), digest)
        return written

    def publish(self, key: str, written: dict[str, CachedSplit], metadata: dict) -> CachedDataset:
        """Make the written splits `key`'s entry: its manifest, written last."""
        manifest = {"key": key, "preprocessing_version": PREPROCESSING_VERSION, **metadata}
        manifest["splits"] = {name: vars(split) for name, split in written.items()}
        self.store.write_json(join(self.entry(key), "manifest.json"), manifest)
        return CachedDataset(
            key=key,
            sources=metadata.get("sources", {}),
            rows_by_source=metadata.get("train_rows_by_source", {}),
            **written,
        )

    def discard(self, key: str) -> None:
        """Remove what `write_splits` wrote for `key`, unless it has become an entry."""
        if not self.store.exists(join(self.entry(key), "manifest.json")):
            self.store.delete(self.entry(key))
