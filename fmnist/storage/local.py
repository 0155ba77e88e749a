"""Local folders as a storage backend: paths on this host's disks (and `file://` URLs).

Whole or absent: a temp file beside the target is fsynced and renamed into place. Create-only:
`os.link` of a finished temp file, which fails if the target exists. Compare-and-swap: compare and
rename under an flock of a sidecar lock file. Reads open regular files only: a FIFO would block
forever, a device (`/dev/zero`) never end.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import posixpath
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist.storage.base import (
    FileStamp,
    NotAFile,
    NotFound,
    PreconditionFailed,
    StorageError,
    StoredFile,
    below,
    refuse_query,
    verify,
)
from fmnist.storage.files import (
    NotARegularFile,
    atomic_path,
    atomic_write_bytes,
    fsync_path,
    make_dirs,
    open_regular,
    temp_path_beside,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


@contextmanager
def _errors(location: str) -> Iterator[None]:
    """Turn OS errors into messages that name `location`."""
    try:
        yield
    except NotFound:
        raise
    except FileExistsError as exc:
        raise PreconditionFailed(f"{location}: already exists") from exc
    except FileNotFoundError as exc:
        raise NotFound(location) from exc
    except PermissionError as exc:
        raise StorageError(f"{location}: permission denied") from exc
    except NotADirectoryError as exc:
        raise NotAFile(f"{location}: a file stands where a folder of this path should be") from exc
    except OSError as exc:
        raise StorageError(f"{location}: {exc.strerror or exc}") from exc


def _open_regular(location: str) -> io.BufferedReader:
    """A local file opened for reading, if it is a regular one; a folder is reported as not found."""
    try:
        return open_regular(Path(location), follow_symlinks=True)
    except NotARegularFile as exc:
        if os.path.isdir(location):
            raise NotFound(location, "is a folder, not a file") from None
        raise NotAFile(f"{location}: {exc.strerror}") from None


class LocalBackend:
    """Local paths, through fsspec's LocalFileSystem for listings and plain OS calls for the rest."""

    def __init__(self, scratch: Path | None = None, timeout_s: float | None = None) -> None:
        del scratch, timeout_s  # a local disk needs neither a scratch folder nor timeouts
        self._fs_instance: AbstractFileSystem | None = None

    def endpoint(self) -> str:
        return "this host's file system"

    @property
    def _fs(self) -> AbstractFileSystem:
        if self._fs_instance is None:
            from fsspec.implementations.local import LocalFileSystem

            self._fs_instance = LocalFileSystem()
        return self._fs_instance

    @staticmethod
    def normalize(location: str) -> str:
        """An absolute path, from a path (`~` expanded) or a `file://` URL (without a query or fragment,
        which would cut its path: `?` and `#` in a path are written %3F and %23)."""
        parts = urllib.parse.urlsplit(location)
        if parts.scheme.lower() == "file":
            refuse_query(location, "file://", "write '?' as %3F and '#' as %23 in a file:// URL, or give a plain path")
            return str(Path(urllib.request.url2pathname(parts.path)).resolve())
        return str(Path(location).expanduser().resolve())

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, location: str) -> bool:
        with _errors(location):
            return self._fs.exists(location)

    def is_dir(self, location: str) -> bool:
        with _errors(location):
            return self._fs.isdir(location)

    def read_bytes(self, location: str) -> bytes:
        with _errors(location), _open_regular(location) as f:
            return f.read()

    def read_versioned(self, location: str) -> tuple[bytes, str] | None:
        try:
            data = self.read_bytes(location)
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def chunks(self, location: str, size: int) -> Iterator[bytes]:
        with _errors(location), _open_regular(location) as f:
            while chunk := f.read(size):
                yield chunk

    def listdir(self, location: str) -> list[str]:
        with _errors(location):
            try:
                entries = self._fs.ls(location, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})

    def find(self, location: str, max_depth: int | None = None) -> list[str]:
        with _errors(location):
            return sorted(below(location, self._fs.find(location, maxdepth=max_depth), max_depth))

    def last_modified(self, location: str) -> datetime | None:
        with _errors(location):
            found = self._fs.find(location, detail=True)
        return max((datetime.fromtimestamp(info["mtime"], UTC) for info in found.values()), default=None)

    def stamps(self, location: str) -> dict[str, FileStamp]:
        """Size, modification time, inode change time (which no user can set: `touch -d`, `cp -p` and
        `rsync -t --inplace` set the modification time back, and change this) and inode."""
        with _errors(location):
            found = self._fs.find(location)
            stamps = {}
            for path in found:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # removed since the listing: as if it had not been listed
                name = "" if path == location else path.removeprefix(location.rstrip("/") + "/")
                version = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                stamps[name] = FileStamp(version, changed_ns=st.st_ctime_ns)
        return stamps

    # --- writes -----------------------------------------------------------------------------------

    def write_bytes(self, location: str, data: bytes) -> None:
        atomic_write_bytes(Path(location), data)

    def put_file(self, local: Path, location: str) -> None:
        with atomic_path(Path(location)) as tmp:
            shutil.copyfile(local, tmp)

    def create(self, location: str, data: bytes) -> None:
        target = Path(location)
        make_dirs(target.parent)
        tmp = temp_path_beside(target)
        try:
            tmp.write_bytes(data)
            fsync_path(tmp)
            os.link(tmp, target)  # atomic, and fails if `target` exists: the local If-None-Match
        except FileExistsError as exc:
            raise PreconditionFailed(f"{location}: already exists") from exc
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(target.parent)

    def replace(self, location: str, data: bytes, etag: str) -> None:
        target = Path(location)
        with open(target.with_name(f".{target.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            current = self.read_versioned(location)
            if current is None or current[1] != etag:
                raise PreconditionFailed(f"{location}: changed by another writer")
            atomic_write_bytes(target, data)

    def delete(self, location: str) -> None:
        path = Path(location)
        with _errors(location):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def move(self, source: str, target: str) -> None:
        """One rename (or a copy, where the target is on another disk)."""
        if not os.path.lexists(source):
            raise NotFound(source)
        make_dirs(Path(target).parent)
        with _errors(source):
            shutil.move(source, target)
        fsync_path(Path(target).parent)
        fsync_path(Path(source).parent)

    # --- local copies: the files themselves ------------------------------------------------------------

    def direct_path(self, location: str) -> Path:
        return Path(location)

    def local_copy(self, file: StoredFile) -> Path:
        path = Path(file.location)
        if not path.is_file():
            raise NotFound(file.location)
        verify(path, file)
        return path

    def fetch(self, file: StoredFile, target: Path) -> None:
        with atomic_path(target) as tmp:
            with _errors(file.location), _open_regular(file.location) as source, open(tmp, "wb") as copy:
                shutil.copyfileobj(source, copy)
            verify(tmp, file)

    @contextmanager
    def local_tree(self, location: str, max_bytes: int | None, max_files: int | None) -> Iterator[Path]:
        yield Path(location)  # read in place: its readers bound what they read themselves

    def keep_copy(self, local: Path, stored: StoredFile) -> None:
        """Nothing to keep: the published file is its own local copy."""
