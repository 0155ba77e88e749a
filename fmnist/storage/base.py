"""What every storage backend shares: its protocol, its errors, the record of a stored file, and the
rules for names.

A backend (`fmnist.storage.local`, `fmnist.storage.s3`) implements `Backend` for one kind of location
and keeps the guarantees in `fmnist.storage`'s docstring; `fmnist.storage.store.Store` picks one by
the location's scheme. Adding a backend is one module implementing `Backend`, one line in the store's
table, and one fixture in `tests/conftest.py` that runs every storage test on it.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from fmnist.storage.files import sha256_file


class StorageError(RuntimeError):
    """A store operation that failed; the message names the location and the problem."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the file already exists (create) or changed since it was read (replace)."""


class Unreachable(StorageError):
    """The object store did not answer (refused, timed out, dropped the connection)."""


class TooLarge(StorageError):
    """A folder holding more bytes than its reader accepts."""


class IntegrityError(StorageError):
    """Stored content that does not hash to what was recorded for it."""


class UnsafeName(StorageError):
    """A name from a record or a key that would resolve outside its folder."""


class NotAFile(StorageError):
    """Something other than a regular file where one is read: a FIFO, a device, or a file standing where a
    folder of the path should be. Untrusted folders hold them; their readers skip or name the location."""


class NotFound(FileNotFoundError):
    """No file at a location; the message names it."""

    def __init__(self, location: str, detail: str = "not found") -> None:
        super().__init__(f"{location}: {detail}")
        self.location = location


@dataclass(frozen=True)
class FileStamp:
    """What one listing tells of a file without reading it.

    `version` changes whenever the file's content can have changed: on disk its size, modification
    time, inode change time and inode (the change time is the kernel's: `touch -d`, `cp -p` or
    `rsync -t` set the modification time back, never the change time); in a bucket its size, ETag
    (derived from the content by the server) and LastModified (set by the server on every write).
    `changed_ns` is when the version last changed by this host's clock where that is what tells two
    writes apart (a disk's change time, which a coarse clock shares between writes in one tick), or
    None where the version is derived from the content itself (an ETag).
    """

    version: tuple
    changed_ns: int | None = None


@dataclass(frozen=True)
class StoredFile:
    """A published file and the sha256 its content must have."""

    location: str
    sha256: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.location)


class Backend(Protocol):
    """One kind of location (local folders, an S3 bucket), with the store's guarantees. It is made with
    the store's `scratch` folder (for copies of what is not on this host) and `timeout_s` (per request).

    Every location a method takes is one its `normalize` returned. A backend does not retry what the
    store's callers decide (conditional writes that lost), and raises the errors above, naming the
    location.
    """

    def __init__(self, scratch: Path | None, timeout_s: float) -> None: ...

    @staticmethod
    def normalize(location: str) -> str:
        """The canonical form of `location`, or StorageError if it is not one of this backend's."""

    def endpoint(self) -> str:
        """Where this backend's files are (a server's URL, this host's disk), for messages."""

    # reads
    def exists(self, location: str) -> bool: ...
    def is_dir(self, location: str) -> bool: ...
    def read_bytes(self, location: str) -> bytes: ...
    def read_versioned(self, location: str) -> tuple[bytes, str] | None:
        """The content and an etag that `replace` compares, or None if there is no file."""

    def chunks(self, location: str, size: int) -> Iterator[bytes]:
        """The file's content, `size` bytes at a time."""

    def listdir(self, location: str) -> list[str]: ...
    def find(self, location: str, max_depth: int | None = None) -> list[str]:
        """Paths, relative to `location`, of every file below it (at most `max_depth` names deep),
        literally (no patterns)."""

    def last_modified(self, location: str) -> datetime | None: ...
    def stamps(self, location: str) -> dict[str, FileStamp]:
        """Each file at or below `location` (by path relative to it, "" for `location` itself) and its
        stamp, which changes whenever its content can have changed."""

    # writes
    def write_bytes(self, location: str, data: bytes) -> None:
        """Put: publish `data` whole, replacing what is there."""

    def put_file(self, local: Path, location: str) -> None: ...
    def create(self, location: str, data: bytes) -> None:
        """Put-if-absent: PreconditionFailed if anything is there."""

    def replace(self, location: str, data: bytes, etag: str) -> None:
        """Compare-and-swap: PreconditionFailed unless the file still has `etag`."""

    def delete(self, location: str) -> None: ...
    def move(self, source: str, target: str) -> None:
        """Move a file or folder to a `target` the store has checked is free; whole, or the source kept."""

    # local copies
    def direct_path(self, location: str) -> Path | None:
        """The path on this host that *is* `location` (written to in place), or None if it has none."""

    def local_copy(self, file: StoredFile) -> Path: ...
    def fetch(self, file: StoredFile, target: Path) -> None: ...
    def local_tree(
        self, location: str, max_bytes: int | None, max_files: int | None
    ) -> AbstractContextManager[Path]: ...
    def keep_copy(self, local: Path, stored: StoredFile) -> None:
        """After `local` was published as `stored`: keep it as this host's copy, if this backend keeps any."""


def join(location: str, *parts: str) -> str:
    return posixpath.join(location, *parts)


def parent(location: str) -> str:
    return posixpath.dirname(location)


def name_parts(location: str, name: str) -> list[str]:
    """The parts of a relative `name` taken from a record or a key, refused unless it stays in `location`.

    A name is untrusted: an absolute path, an empty or `.`/`..` part, a backslash or a NUL would put
    what it names (or what is written under it) outside the folder.
    """
    parts = name.split("/") if isinstance(name, str) else [""]
    if any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        raise UnsafeName(f"{location}: {name!r} is not a name inside this folder; refusing it")
    return parts


def inside(location: str, name: str) -> str:
    """`location/name`, for a `name` that `name_parts` accepts."""
    return join(location, *name_parts(location, name))


def without_credentials(url: str) -> str:
    """`url` as it may be shown in a log, an artifact or a message: a user name or password in it hidden."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="<credentials>@" + parts.netloc.rsplit("@", 1)[1]))


def refuse_credentials(url: str, kind: str, instead: str) -> None:
    """Raise StorageError, showing `url` without them, if it holds credentials (which would reach the
    flow run's parameters, the logs, the artifacts and the notifications)."""
    if "@" in urllib.parse.urlsplit(url).netloc:
        raise StorageError(f"{without_credentials(url)}: credentials do not belong in a {kind} URL; {instead}")


def verify(path: Path, file: StoredFile) -> None:
    """Raise IntegrityError, naming `file`'s location, unless the local `path` holds `file`'s content."""
    if (found := sha256_file(path)) != file.sha256:
        raise IntegrityError(f"{file.location}: sha256 {found} is not the recorded {file.sha256}")


def below(path: str, found: Iterable[str], max_depth: int | None = None) -> dict[str, str]:
    """Each of the listed paths `found` that is below `path` (at most `max_depth` names deep), by its
    path relative to `path`."""
    prefix = path.rstrip("/") + "/"
    inner = {f.removeprefix(prefix): f for f in found if f.startswith(prefix)}
    return {name: f for name, f in inner.items() if max_depth is None or name.count("/") < max_depth}


def refuse_query(location: str, kind: str, instead: str) -> None:
    """Raise StorageError, saying what to do `instead`, if the URL `location` holds a `?` or a `#`: they
    start a query or a fragment, which cuts the path there (`file:///m?/train.gz` reads `/m`), so a
    folder URL holding one would read other files than those named below it."""
    if "?" in location or "#" in location:
        raise StorageError(
            f"{without_credentials(location)!r}: a {kind} URL takes no query or fragment ('?' or '#' would "
            f"end its path there, and reads would go to another file); {instead}"
        )
