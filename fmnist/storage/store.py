"""The store: the one object through which every stage reads and writes, whatever holds the files.

`Store` picks a backend by each location's scheme (`BACKENDS`), makes it once, and adds what holds on
every backend alike: JSON, hashing, folders published marker last, moves that never overwrite, and
conditional writes that recognise their own lost acknowledgement.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fmnist.storage.base import Backend, IntegrityError, PreconditionFailed, StorageError, StoredFile, join
from fmnist.storage.files import atomic_path, sha256_file, sha256_text
from fmnist.storage.local import LocalBackend
from fmnist.storage.s3 import S3Backend
from fmnist.storage.scratch import Scratch, require_scratch, temporary_folder

# A location's scheme -> its backend. A path has none; a one-letter scheme is a Windows drive.
BACKENDS: dict[str, type[Backend]] = {"": LocalBackend, "file": LocalBackend, "s3": S3Backend}
_CHUNK = 1 << 20
# A stamp vouches for content only once every file in it last changed this long ago: a later write gets
# a change time of a later clock tick, never the recorded one. Over the coarsest clock a stamp meets
# (1 s on ext3 and HFS+; the kernel's ticks are milliseconds), with room for a network file system's
# clock to lag this host's.
SETTLE_S = 2.0


@dataclass(frozen=True)
class Stamp:
    """A digest of what one listing tells of a file or folder (`FileStamp` of each file, by name)."""

    digest: str
    # Every file's stamp is settled: changed at least `SETTLE_S` before it was taken (or, in a bucket,
    # made of what the server derives from the content). Only a settled stamp may vouch for content:
    # an unsettled one can stay the same across a write in the same clock tick.
    settled: bool


def _backend_type(location: str) -> type[Backend]:
    try:
        scheme = urllib.parse.urlsplit(location).scheme.lower()
    except ValueError as exc:
        raise StorageError(f"{location!r}: not a path or a URL ({exc})") from None
    scheme = "" if len(scheme) == 1 else scheme
    if scheme not in BACKENDS:
        supported = ", ".join(f"{s}://" for s in BACKENDS if s)
        raise StorageError(f"{location!r}: unsupported scheme {scheme!r}; use a local path or {supported}")
    return BACKENDS[scheme]


def _lands(write: Callable[[], None]) -> bool:
    """Whether a write that must be refused went through."""
    try:
        write()
    except PreconditionFailed:
        return False
    return True


def normalize(location: str) -> str:
    """The canonical form of a location (an absolute path, `s3://bucket[/key]` without a trailing
    slash, ...); anything no backend takes is refused."""
    if not location.strip():
        raise StorageError("an empty location; give a folder or an s3://bucket/prefix URL")
    return _backend_type(location).normalize(location)


class Store:
    """Reads and writes any location a backend takes, with the guarantees in `fmnist.storage`.

    `scratch` is this host's folder for verified copies of remote files (needed only where a backend
    has no local path); `timeout_s` bounds each request of a backend that makes requests.
    """

    def __init__(self, scratch: Path | None = None, timeout_s: float = 30.0) -> None:
        self.scratch = scratch
        self.timeout_s = timeout_s
        self._backends: dict[type[Backend], Backend] = {}
        self._conditions_hold: set[str] = set()  # roots whose store was seen to honour conditional writes

    def _backend(self, location: str) -> Backend:
        kind = _backend_type(location)
        if kind not in self._backends:
            self._backends[kind] = kind(scratch=self.scratch, timeout_s=self.timeout_s)
        return self._backends[kind]

    def direct_path(self, location: str) -> Path | None:
        """The path on this host that is `location` itself, written in place; None where a stage must
        work in a local copy and publish what it makes (a bucket)."""
        return self._backend(location).direct_path(location)

    def require_scratch(self, location: str) -> Path:
        return require_scratch(self.scratch, location)

    def prune_scratch(self) -> int:
        """Delete this host's scratch copies unused for two weeks; how many (none without scratch)."""
        return Scratch(self.scratch).prune() if self.scratch else 0

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, location: str) -> bool:
        return self._backend(location).exists(location)

    def is_dir(self, location: str) -> bool:
        return self._backend(location).is_dir(location)

    def read_bytes(self, location: str) -> bytes:
        """The file's content; FileNotFoundError (naming it) if there is none."""
        return self._backend(location).read_bytes(location)

    def read_at_most(self, location: str, max_bytes: int) -> bytes | None:
        """The file's content, read no further than `max_bytes`: None if it holds more (an untrusted file is
        never read whole). FileNotFoundError if there is none; NotAFile for a FIFO, a device, or the like."""
        chunks, size = [], 0
        for chunk in self.iter_chunks(location):
            size += len(chunk)
            if size > max_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def read_json(self, location: str) -> Any:
        return self.parse_json(self.read_bytes(location), location)

    @staticmethod
    def parse_json(data: bytes, location: str) -> Any:
        """`data` (read from `location`) as JSON; IntegrityError naming it if it is not, or nests too deep
        to parse (a RecursionError is no ValueError: without this, `[[[...` is a traceback, not damage)."""
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            problem = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise IntegrityError(f"{location}: not valid JSON ({problem})") from None

    def read_versioned(self, location: str) -> tuple[bytes, str] | None:
        """The file's content and its etag (what `replace` compares), or None if there is no file."""
        return self._backend(location).read_versioned(location)

    def listdir(self, location: str) -> list[str]:
        """Names of the files and folders directly in `location` (none if it does not exist)."""
        return self._backend(location).listdir(location)

    def find(self, location: str, max_depth: int | None = None) -> list[str]:
        """Paths, relative to `location`, of every file below it (at most `max_depth` names deep)."""
        return self._backend(location).find(location, max_depth)

    def last_modified(self, location: str) -> datetime | None:
        """When a file at or below `location` last changed; None if there is none."""
        return self._backend(location).last_modified(location)

    def stamp(self, location: str) -> Stamp | None:
        """What tells whether a file at or below `location` was written, added or removed since, without
        reading it: a digest of each file's name and stamp (`FileStamp`: size, modification and inode
        change times and inode on disk; size, ETag and LastModified in a bucket); None if there is none.
        One listing. What it may vouch for is in `Stamp.settled`; what is read is still verified
        against its sha256."""
        stamps = self._backend(location).stamps(location)
        if not stamps:
            return None
        digest = sha256_text(json.dumps(sorted((name, list(s.version)) for name, s in stamps.items())))
        newest = max((s.changed_ns for s in stamps.values() if s.changed_ns is not None), default=None)
        return Stamp(digest, settled=newest is None or newest < time.time_ns() - int(SETTLE_S * 1e9))

    def fingerprint(self, location: str) -> str | None:
        """The digest of `stamp`, settled or not."""
        stamp = self.stamp(location)
        return stamp.digest if stamp else None

    def iter_chunks(self, location: str) -> Iterator[bytes]:
        return self._backend(location).chunks(location, _CHUNK)

    def sha256(self, location: str) -> str:
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(location):
            digest.update(chunk)
        return digest.hexdigest()

    def local_copy(self, file: StoredFile) -> Path:
        """A local file with `file`'s verified content: the file itself where it has a local path, else a
        scratch copy (reused only while the stored object is unchanged, and re-hashed first). Raises
        FileNotFoundError if the file is missing and IntegrityError if it does not hash to `file.sha256`."""
        return self._backend(file.location).local_copy(file)

    def fetch(self, file: StoredFile, target: Path) -> None:
        """Copy `file` to the local `target` (whole, atomically) if its content verifies; else raise."""
        self._backend(file.location).fetch(file, target)

    @contextmanager
    def local_tree(self, location: str, max_bytes: int | None = None, max_files: int | None = None) -> Iterator[Path]:
        """The folder `location` as a local folder: itself on disk, else a temporary download of it
        (refused before any download if it holds more than `max_bytes`, or more than `max_files` files,
        or a key that is no name inside it, or a name that is both a file and a folder)."""
        with self._backend(location).local_tree(location, max_bytes, max_files) as folder:
            yield folder

    # --- writes -----------------------------------------------------------------------------------

    def write_bytes(self, location: str, data: bytes) -> None:
        """Publish `data` at `location`, replacing what is there, in one step."""
        self._backend(location).write_bytes(location, data)

    def write_json(self, location: str, value: Any) -> None:
        self.write_bytes(location, json.dumps(value, indent=1).encode())

    def create(self, location: str, data: bytes) -> None:
        """Publish `data` at `location` only if nothing is there; else raise PreconditionFailed.

        A location that already holds exactly `data` was created by this writer: its answer was lost and
        the retry (botocore's, or aiohttp's own on a dropped connection) met its own write. So `data`
        must say whose it is (a token, a time), or another writer's equal bytes pass for this one's.
        """
        try:
            self._backend(location).create(location, data)
        except PreconditionFailed:
            if not self._holds(location, data):
                raise

    def replace(self, location: str, data: bytes, etag: str | None) -> None:
        """Publish `data` only if `location` still has `etag` (None: if it still does not exist).

        As with `create`, a location that already holds exactly `data` was replaced by this writer.
        """
        if etag is None:
            self.create(location, data)
            return
        try:
            self._backend(location).replace(location, data, etag)
        except PreconditionFailed:
            if not self._holds(location, data):
                raise

    def require_conditional_writes(self, root: str) -> None:
        """Refuse a store that ignores create-only and compare-and-swap conditions, before anything is
        written under `root` that relies on them. Some S3-compatible servers ignore `If-None-Match` and
        `If-Match`: there two registrations claim one version, and a promotion overwrites another. A
        probe of this writer's own (`root/.write-check/TOKEN/`) is created, created again and replaced
        with a stale etag (both must fail), then deleted. Once per root and store."""
        if root in self._conditions_hold:
            return
        folder = join(root, ".write-check", uuid.uuid4().hex)
        probe = join(folder, "probe.json")
        try:
            self.create(probe, b'{"probe": 1}')
            backend = self._backend(probe)
            refused_writes = {  # each must fail on a store that honours conditions
                "a create over an existing file (If-None-Match: *)": lambda: backend.create(probe, b'{"probe": 2}'),
                "a replace with a stale etag (If-Match)": lambda: backend.replace(probe, b'{"probe": 3}', '"stale"'),
            }
            ignored = [what for what, write in refused_writes.items() if _lands(write)]
        finally:
            self.delete(folder)
        if ignored:
            raise StorageError(
                f"{root}: the store at {self._backend(root).endpoint()} ignores conditional writes "
                f"({' and '.join(ignored)} succeeded where they must fail). The registry needs create-only "
                "(If-None-Match: *) and compare-and-swap (If-Match) writes to never give one version number "
                "twice or lose a promotion: use a store that honours them (AWS S3, MinIO, SeaweedFS, Ceph RGW)"
            )
        self._conditions_hold.add(root)

    def _holds(self, location: str, data: bytes) -> bool:
        """Whether `location` holds exactly `data` now."""
        current = self.read_versioned(location)
        return current is not None and current[0] == data

    def put_file(self, local: Path, location: str) -> None:
        """Copy a local file to `location` whole, replacing what is there."""
        self._backend(location).put_file(local, location)

    def publish(self, local: Path, location: str) -> StoredFile:
        """Publish the local file at `location` (whole) and return it with its sha256; the backend keeps
        it as this host's copy where it keeps copies, so reading it back here needs no download."""
        stored = StoredFile(location, sha256_file(local))
        backend = self._backend(location)
        if backend.direct_path(location) != local:
            self.put_file(local, location)
        backend.keep_copy(local, stored)
        return stored

    @contextmanager
    def staged(self, location: str) -> Iterator[Path]:
        """Yield a local path to write; if the block succeeds, publish that file at `location` whole."""
        if (path := self.direct_path(location)) is not None:
            with atomic_path(path) as tmp:
                yield tmp
            return
        with temporary_folder(self.scratch, location) as folder:
            tmp = folder / posixpath.basename(location)
            yield tmp
            self.publish(tmp, location)

    @contextmanager
    def staged_tree(self, location: str, *, marker: str) -> Iterator[Path]:
        """Yield an empty local folder to fill; if the block succeeds, publish it at `location`, `marker` last."""
        with tempfile.TemporaryDirectory(prefix="fmnist-staged-") as folder:
            yield Path(folder)
            self.put_tree(Path(folder), location, marker=marker)

    def put_tree(self, local: Path, location: str, *, marker: str) -> None:
        """Copy a local folder to `location`, its `marker` file last: readers see it once the marker is there."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        if local / marker not in files:
            raise StorageError(f"{local}: no {marker} to publish {location} with")
        for file in [f for f in files if f != local / marker] + [local / marker]:
            self.put_file(file, join(location, *file.relative_to(local).parts))

    def move(self, source: str, target: str) -> None:
        """Move the file or folder `source`, and all it holds, to `target`, where nothing may be yet.

        Names are literal. Whole, or the source left as it was (see each backend's `move`).
        """
        backend = self._backend(source)
        if self._backend(target) is not backend:
            raise StorageError(f"{source} -> {target}: a move stays on one store")
        if backend.exists(target) or backend.find(target):
            raise PreconditionFailed(f"{target}: already exists")
        backend.move(source, target)

    def delete(self, location: str) -> None:
        """Remove a file or a folder and all it holds (names are literal); nothing there is not an error."""
        self._backend(location).delete(location)
