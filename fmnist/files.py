"""Local files: hashing, and atomic writes that survive a crash (a reader sees the old file or the new one).

These are the local-disk primitives under `fmnist.storage`, and what a stage uses for the files of its
own local working folder (Keras checkpoints, plots) before they are published to the store.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(*parts: str) -> str:
    """Stable key from ordered parts (content hashes, versions)."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path_beside(target: Path) -> Path:
    """A unique hidden name in `target`'s folder that keeps its suffix (Keras picks the format from it)."""
    return target.with_name(f".part-{uuid.uuid4().hex}-{target.name}")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; if the block succeeds, fsync it and rename it onto `target`.

    After a crash at any moment `target` holds either its old content or the whole new one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode())
