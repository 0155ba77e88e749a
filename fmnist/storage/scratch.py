"""A host's verified copies of remote files, reused across runs and re-hashed before every use."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmnist.storage.base import StorageError, StoredFile
from fmnist.storage.files import atomic_write_bytes, sha256_file

SCRATCH_KEPT_S = 14 * 24 * 3600  # a scratch copy unused for two weeks is deleted (it can be fetched again)


def default_scratch_dir() -> Path:
    """This host's folder for verified copies of remote files: `$XDG_CACHE_HOME/fashion-mnist-pipeline`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fashion-mnist-pipeline"


def require_scratch(scratch: Path | None, location: str) -> Path:
    """`scratch`, or StorageError naming `location` if this host has none."""
    if scratch is None:
        raise StorageError(f"{location}: reading remote files needs a scratch folder on this host")
    return scratch


@contextmanager
def temporary_folder(scratch: Path | None, location: str) -> Iterator[Path]:
    """A temporary folder in the scratch folder (the disk the copies of `location` go to), deleted after."""
    tmp_root = require_scratch(scratch, location) / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as folder:
        yield Path(folder)


class Scratch:
    """A host's verified copies of remote files: `objects/<sha256><suffix>`, and the objects they came from.

    `<copy>.sources.json` maps each s3:// location to the etag its object had when this content was
    fetched or published there: a copy stands for a location only while that object is unchanged.
    Run folders' local working copies sit beside them in `runs/<id>/`. Everything here can be
    fetched again, so `prune` drops what has not been used for a while.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"

    def prune(self, unused_for_s: float = SCRATCH_KEPT_S) -> int:
        """Delete copies and run folders unused for `unused_for_s`; return how many were deleted."""
        cutoff = time.time() - unused_for_s
        stale = [p for folder in (self.objects, self.root / "runs") if folder.is_dir() for p in folder.iterdir()]
        stale = [p for p in stale if not p.name.endswith(".sources.json") and p.stat().st_mtime < cutoff]
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.with_name(path.name + ".sources.json").unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        return len(stale)

    def path(self, file: StoredFile) -> Path:
        return self.objects / (file.sha256 + posixpath.splitext(file.location)[1])

    def _sources(self, copy: Path) -> dict[str, str]:
        try:
            return json.loads(copy.with_name(copy.name + ".sources.json").read_text())
        except (OSError, ValueError):
            return {}

    def get(self, file: StoredFile, etag: str) -> Path | None:
        """The copy of `file` if its object still has `etag` and the copy still hashes right (else None)."""
        copy = self.path(file)
        if not copy.is_file() or self._sources(copy).get(file.location) != etag:
            return None
        if sha256_file(copy) != file.sha256:
            copy.unlink(missing_ok=True)  # damaged on this host: fetch it again
            return None
        os.utime(copy)  # its last use, for whoever prunes the scratch folder
        return copy

    def remember(self, file: StoredFile, etag: str) -> None:
        copy = self.path(file)
        sources = {**self._sources(copy), file.location: etag}
        atomic_write_bytes(copy.with_name(copy.name + ".sources.json"), json.dumps(sources).encode())
