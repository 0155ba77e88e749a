"""Hashing and atomic writes: a reader never sees a half-written file or folder."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds.

    The temp name keeps the target's suffix (Keras picks the format from it) and starts with a dot.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".part-{uuid.uuid4().hex}-{target.name}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target` and publish it as `target` if the block succeeds.

    A stale `target` (one the caller decided not to trust) is moved aside first. If another
    process published the same `target` meanwhile, its copy wins and ours is dropped: callers
    use content-addressed names, so both copies hold the same thing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            trash = target.with_name(f".{target.name}.{uuid.uuid4().hex}.stale")
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
