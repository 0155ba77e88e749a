"""The IDX file format (LeCun's MNIST format), plain or gzip-compressed.

Layout: a big-endian magic number (two zero bytes, a type code, the number of dimensions), one
uint32 per dimension, then the values. Only uint8 data (type code 0x08) is used here.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

UINT8_TYPE_CODE = 0x08
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: count, rows, columns
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: count
GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """A file that is not a well-formed IDX file; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed if its name ends in .gz."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdxFormatError(path, f"cannot read file ({exc.strerror})") from exc
    if not data:
        raise IdxFormatError(path, "file is empty")
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except gzip.BadGzipFile as exc:
        raise IdxFormatError(path, f"not a gzip file ({exc})") from exc
    except EOFError as exc:
        raise IdxFormatError(path, "truncated gzip stream (the download was cut short)") from exc
    except zlib.error as exc:
        raise IdxFormatError(path, f"corrupt gzip stream ({exc})") from exc


def parse_idx(data: bytes, path: Path, magic: int) -> np.ndarray:
    """Check `data` against the IDX header it carries and return it as a read-only uint8 array."""
    if len(data) < 4:
        raise IdxFormatError(path, f"{len(data)} bytes is too short for an IDX header")
    found = int.from_bytes(data[:4], "big")
    if data[:2] == GZIP_MAGIC:
        raise IdxFormatError(path, "gzip-compressed, but its name does not end in .gz")
    if found != magic:
        raise IdxFormatError(path, f"wrong magic number 0x{found:08x}, expected 0x{magic:08x} for this kind of file")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxFormatError(path, f"header of {ndim} dimensions is cut short")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    expected = header_size + int(np.prod(dims, dtype=np.int64))
    if len(data) < expected:
        raise IdxFormatError(
            path,
            f"header claims shape {dims} ({expected:,} bytes) but the file has {len(data):,} bytes",
        )
    if len(data) > expected:
        raise IdxFormatError(path, f"{len(data) - expected:,} unexpected bytes after the data of shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def read_images(path: Path) -> np.ndarray:
    """(count, rows, columns) uint8 images."""
    return parse_idx(read_bytes(path), path, IMAGES_MAGIC)


def read_labels(path: Path) -> np.ndarray:
    """(count,) uint8 labels."""
    return parse_idx(read_bytes(path), path, LABELS_MAGIC)


def read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and their labels, which must be equal in number."""
    images = read_images(images_path)
    labels = read_labels(labels_path)
    if len(images) != len(labels):
        raise IdxFormatError(
            labels_path,
            f"{len(labels):,} labels for the {len(images):,} images in {images_path.name}",
        )
    return images, labels


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array (for tests, fixtures and exporting batches)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, UINT8_TYPE_CODE, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
