"""The IDX file format (LeCun's MNIST format), plain or gzip-compressed.

Layout: a big-endian magic number (two zero bytes, a type code, the number of dimensions), one
uint32 per dimension, then the values. Only uint8 data (type code 0x08) is used here.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fmnist.storage.files import open_regular

UINT8_TYPE_CODE = 0x08
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: count, rows, columns
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: count
GZIP_MAGIC = b"\x1f\x8b"
# The largest file read: the canonical training images are 47 MB; 128 MiB is about 170,000 images.
MAX_IDX_BYTES = 128 << 20
TRAILING_SHOWN = 1 << 20  # bytes after the data that are counted for the error message


class IdxFormatError(ValueError):
    """A file that is not a well-formed IDX file; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _open_stream(raw: io.BufferedReader, path: Path) -> BinaryIO:
    """The decompressed stream of a `.gz` file (decompressed only as far as it is read), else the file."""
    head = raw.peek(2)[:2]
    if not head:
        return raw  # empty: the parser says so
    if path.suffix.lower() != ".gz":
        if head == GZIP_MAGIC:
            raise IdxFormatError(path, "gzip-compressed, but its name does not end in .gz")
        return raw
    if head != GZIP_MAGIC:
        raise IdxFormatError(path, "not a gzip file (it does not start with the gzip magic bytes)")
    return gzip.GzipFile(fileobj=raw, mode="rb")


def read_idx(path: Path, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """The IDX file at `path` (gzip-compressed if its name ends in .gz) as a read-only uint8 array.

    Only a regular file is read; the header's claimed size is checked against `max_bytes` before the
    data is read, and nothing beyond the claimed size is decompressed (a gzip bomb costs nothing).
    """
    try:
        with open_regular(path) as raw, _open_stream(raw, path) as stream:
            return _parse(stream, path, magic, max_bytes)
    except IdxFormatError:
        raise
    except EOFError as exc:
        raise IdxFormatError(path, "truncated gzip stream (the download was cut short)") from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IdxFormatError(path, f"corrupt gzip stream ({exc})") from exc
    except OSError as exc:
        raise IdxFormatError(path, f"cannot read file ({exc.strerror or exc})") from exc


def _parse(stream: BinaryIO, path: Path, magic: int, max_bytes: int) -> np.ndarray:
    head = stream.read(4)
    if not head:
        raise IdxFormatError(path, "file is empty")
    if len(head) < 4:
        raise IdxFormatError(path, f"{len(head)} bytes is too short for an IDX header")
    found = int.from_bytes(head, "big")
    if found != magic:
        raise IdxFormatError(path, f"wrong magic number 0x{found:08x}, expected 0x{magic:08x} for this kind of file")
    ndim = head[3]
    dims_bytes = stream.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise IdxFormatError(path, f"header of {ndim} dimensions is cut short")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    header_size = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64))
    if dims[0] == 0:
        raise IdxFormatError(path, f"holds no items (shape {dims})")
    if expected > max_bytes:
        raise IdxFormatError(
            path, f"header claims shape {dims} ({expected:,} bytes), over the {max_bytes:,}-byte limit for one file"
        )
    data = stream.read(expected)
    if len(data) < expected:
        raise IdxFormatError(
            path,
            f"header claims shape {dims} ({header_size + expected:,} bytes) but the file has "
            f"{header_size + len(data):,} bytes",
        )
    if trailing := len(stream.read(TRAILING_SHOWN + 1)):
        count = f"{trailing:,}" if trailing <= TRAILING_SHOWN else f"more than {TRAILING_SHOWN:,}"
        raise IdxFormatError(path, f"{count} unexpected bytes after the data of shape {dims}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def read_images(path: Path) -> np.ndarray:
    """(count, rows, columns) uint8 images."""
    return read_idx(path, IMAGES_MAGIC)


def read_labels(path: Path) -> np.ndarray:
    """(count,) uint8 labels."""
    return read_idx(path, LABELS_MAGIC)


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
