"""The parquet cache of normalized data: the one place that knows its paths, format and metadata.

An entry is a folder named by its content key, holding `train.parquet`, `test.parquet` and a
`manifest.json` with each file's sha256. Entries are published whole (temp folder + rename), and a
lookup counts as a hit only if the manifest is there and every file still hashes to it.

Each parquet file has two columns, `image` (fixed-size list of 784 float32 pixels in [0, 1]) and
`label` (uint8), and carries its key, sources and shape in the schema metadata. Pixels are
dictionary-encoded (a normalized 8-bit image has at most 256 distinct values) and zstd-compressed:
25 MB for the training split instead of 179 MB plain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmnist.dataset import IMAGE_SIZE
from fmnist.files import atomic_dir, sha256_file, sha256_text

# Bump when what normalization produces changes: entries of other versions are not reused.
PREPROCESSING_VERSION = "1"
METADATA_KEY = b"fashion_mnist"
SPLITS = ("train", "test")
PIXELS = IMAGE_SIZE * IMAGE_SIZE


@dataclass(frozen=True)
class CachedSplit:
    path: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class CachedDataset:
    """What training needs to find the data: small, and the same on every host of the run."""

    key: str
    train: CachedSplit
    test: CachedSplit
    reused: bool = False


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
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> CachedDataset | None:
        """The entry for `key` if it is complete and every file verifies, else None."""
        manifest_file = self.entry_dir(key) / "manifest.json"
        try:
            manifest = json.loads(manifest_file.read_text())
            splits = {name: CachedSplit(**manifest["splits"][name]) for name in SPLITS}
            if not all(sha256_file(Path(s.path)) == s.sha256 for s in splits.values()):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return CachedDataset(key=key, reused=True, **splits)

    def store(self, key: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], metadata: dict) -> CachedDataset:
        """Write every split and publish the entry at once; a failure leaves no entry behind."""
        final = self.entry_dir(key)
        written = {}
        with atomic_dir(final) as tmp:
            for name in SPLITS:
                pixels, labels = splits[name]
                file = tmp / f"{name}.parquet"
                write_split(
                    file,
                    pixels,
                    labels,
                    {**metadata, "key": key, "split": name, "shape": [len(labels), IMAGE_SIZE, IMAGE_SIZE]},
                )
                written[name] = CachedSplit(str(final / file.name), len(labels), sha256_file(file))
            manifest = {"key": key, "preprocessing_version": PREPROCESSING_VERSION, **metadata}
            manifest["splits"] = {name: vars(split) for name, split in written.items()}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return CachedDataset(key=key, **written)
