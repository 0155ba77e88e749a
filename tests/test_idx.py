"""The IDX reader: each malformed file gets its own clear error naming the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import idx


def write(path: Path, data: bytes, compress: bool = True) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def test_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    for suffix, compress in (("", False), (".gz", True)):
        i = write(tmp_path / f"images{suffix}", idx.encode_idx(images), compress)
        lab = write(tmp_path / f"labels{suffix}", idx.encode_idx(labels), compress)
        got_images, got_labels = idx.read_pair(i, lab)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    ("content", "compress", "message"),
    [
        (b"", False, "file is empty"),
        (b"not gzip at all", False, "not a gzip file"),
        (gzip.compress(idx.encode_idx(np.zeros((4, 28, 28))))[:-20], False, "truncated gzip stream"),
        (idx.encode_idx(np.zeros(4)), True, "wrong magic number 0x00000801, expected 0x00000803"),
        (idx.encode_idx(np.zeros((4, 28, 28)))[:-100], True, "header claims shape (4, 28, 28) (3,152 bytes)"),
        (idx.encode_idx(np.zeros((4, 28, 28))) + b"xx", True, "2 unexpected bytes after the data"),
        (b"\x00\x00", True, "too short for an IDX header"),
    ],
    ids=["empty", "not-gzip", "truncated-gzip", "wrong-magic", "short-data", "trailing-bytes", "short-header"],
)
def test_malformed_images_file(tmp_path: Path, content: bytes, compress: bool, message: str) -> None:
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(idx.IdxFormatError) as caught:
        idx.read_images(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    images = write(tmp_path / "a-images-idx3-ubyte.gz", idx.encode_idx(np.zeros((5, 28, 28))))
    labels = write(tmp_path / "a-labels-idx1-ubyte.gz", idx.encode_idx(np.zeros(4)))
    with pytest.raises(idx.IdxFormatError, match=r"4 labels for the 5 images in a-images-idx3-ubyte.gz") as caught:
        idx.read_pair(images, labels)
    assert caught.value.path == labels


def test_other_image_sizes_are_read_as_they_are(tmp_path: Path) -> None:
    # Size is the data contract's business (the GX suite), not the format's.
    path = write(tmp_path / "images.gz", idx.encode_idx(np.zeros((2, 30, 30))))
    assert idx.read_images(path).shape == (2, 30, 30)


def test_compressed_file_without_gz_name(tmp_path: Path) -> None:
    path = write(tmp_path / "images", idx.encode_idx(np.zeros((2, 28, 28))))
    with pytest.raises(idx.IdxFormatError, match=r"gzip-compressed, but its name does not end in \.gz"):
        idx.read_images(path)
