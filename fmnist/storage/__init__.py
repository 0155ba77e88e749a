"""Where the pipeline keeps things, and every guarantee it makes about them.

A location is a local path or an `s3://bucket/key` URL. One `Store` reads and writes both through
fsspec (its LocalFileSystem, and s3fs for S3); nothing else in the pipeline opens a stored file. What
every stage relies on, on local disk and on object storage alike:

- **Whole or absent.** A file is published in one step: on disk, a temp file beside it is fsynced and
  renamed into place; on S3, one PUT (or a completed multipart upload), which readers see whole or not
  at all. A folder (a cache entry, a validation result, a registry version, a checkpoint) is published
  by writing its marker file last: a folder without its marker does not exist for any reader.
- **Create-only.** `create` writes a file only if nothing is there yet: `os.link` of a finished temp
  file on disk, `If-None-Match: *` on S3. Registry version numbers, version manifests and the audit
  log are written this way, so two hosts never overwrite each other's work.
- **Compare-and-swap.** `replace` writes a file only if it still holds what the caller read (its
  etag): `If-Match` on S3; on disk, compare and rename under an flock of a sidecar lock file (local
  disks have locks; object stores do not, and need none). The champion pointer moves this way.
- **Verified reads.** Content is asked for by its sha256: `local_copy` returns a local file that hashes
  to it, or raises. Copies of remote objects are kept in a scratch folder named by their hash, reused
  across runs and re-hashed before every use.
- **Secrets stay out.** Credentials and the endpoint come from the standard AWS chain
  (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `AWS_REGION`, or a profile); a
  location with credentials in it is refused, so none reaches a parameter, a record or a log line.
- **Names are literal.** `*`, `?`, `[` in a name are characters, on every backend: listing, copying,
  moving and deleting never expand a pattern (fsspec's `copy`, `mv`, `rm` and `expand_path` glob on S3,
  so they are not used). A name read from a record or a key is resolved with `inside`, which refuses
  one that would land outside its folder.
- **Lost acknowledgements.** A create-only or compare-and-swap PUT whose answer was lost may have
  landed: its retry (botocore's, or aiohttp's own, unseen, on a dropped connection) then meets the
  writer's own write and gets 412. So a conditional write that fails against exactly the bytes it meant
  to write has succeeded; writers put a token of their own in such files (a claim's, a record's), so
  equal bytes are theirs, on disk and in a bucket alike.
- **No hangs.** Every S3 request has a timeout and a bounded number of attempts; an error names the
  location and the problem (no such bucket, access denied, endpoint unreachable).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist.storage.files import (
    NotARegularFile,
    atomic_path,
    atomic_write_bytes,
    fsync_path,
    make_dirs,
    open_regular,
    sha256_file,
    temp_path_beside,
)

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

S3 = "s3://"
S3_ATTEMPTS = 3  # per request, with botocore's exponential backoff; s3fs adds no retry layer of its own
SCRATCH_KEPT_S = 14 * 24 * 3600  # a scratch copy unused for two weeks is deleted (it can be fetched again)
_CHUNK = 1 << 20


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


class NotFound(FileNotFoundError):
    """No file at a location; the message names it."""

    def __init__(self, location: str, detail: str = "not found") -> None:
        super().__init__(f"{location}: {detail}")
        self.location = location


@dataclass(frozen=True)
class StoredFile:
    """A published file and the sha256 its content must have."""

    location: str
    sha256: str

    @property
    def name(self) -> str:
        return posixpath.basename(self.location)


def is_remote(location: str) -> bool:
    return location.startswith(S3)


def join(location: str, *parts: str) -> str:
    return posixpath.join(location, *parts)


def parent(location: str) -> str:
    return posixpath.dirname(location)


class UnsafeName(StorageError):
    """A name from a record or a key that would resolve outside its folder."""


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


def normalize(location: str) -> str:
    """An absolute local path, or `s3://bucket[/key]` without a trailing slash; anything else is refused."""
    if not location.strip():
        raise StorageError("an empty location; give a folder or an s3://bucket/prefix URL")
    parts = urllib.parse.urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        refuse_credentials(
            location, "storage", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment instead"
        )
        if not parts.netloc:
            raise StorageError(f"{location!r}: no bucket name (expected s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise StorageError(f"{location!r}: a storage URL takes no query or fragment")
        return f"{S3}{parts.netloc}/{parts.path.strip('/')}".rstrip("/")
    if scheme == "file":
        return str(Path(urllib.request.url2pathname(parts.path)).resolve())
    if len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise StorageError(f"{location!r}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    return str(Path(location).expanduser().resolve())


def default_scratch_dir() -> Path:
    """This host's folder for verified copies of remote files: `$XDG_CACHE_HOME/fashion-mnist-pipeline`."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "fashion-mnist-pipeline"


def _open_local(location: str) -> io.BufferedReader:
    """A local file opened for reading, if it is a regular one: a FIFO would block forever, a device
    (`/dev/zero`) never end; a folder is reported as not found."""
    try:
        return open_regular(Path(location), follow_symlinks=True)
    except NotARegularFile as exc:
        if os.path.isdir(location):
            raise NotFound(location, "is a folder, not a file") from None
        raise StorageError(f"{location}: {exc.strerror}") from None


def _verify(path: Path, file: StoredFile) -> None:
    """Raise IntegrityError, naming `file`'s location, unless the local `path` holds `file`'s content."""
    if (found := sha256_file(path)) != file.sha256:
        raise IntegrityError(f"{file.location}: sha256 {found} is not the recorded {file.sha256}")


def _below(path: str, found: Iterable[str]) -> dict[str, str]:
    """Each of the listed paths `found` that is below `path`, by its path relative to `path`."""
    prefix = path.rstrip("/") + "/"
    return {f.removeprefix(prefix): f for f in found if f.startswith(prefix)}


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code ('NoSuchBucket', 'PreconditionFailed', ...) behind an s3fs exception."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code") or str(
                response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            )
    return None


class Store:
    """Reads and writes local paths and s3:// URLs with the guarantees in this module's docstring.

    `scratch` is this host's folder for verified copies of remote files (needed only for s3://);
    `timeout_s` bounds each S3 request's connection and each read.
    """

    def __init__(self, scratch: Path | None = None, timeout_s: float = 30.0) -> None:
        self.scratch = scratch
        self.timeout_s = timeout_s
        self._s3fs: AbstractFileSystem | None = None
        self._local: AbstractFileSystem | None = None
        self._checked_buckets: set[str] = set()

    # --- filesystems and errors -------------------------------------------------------------------

    def _fs(self, location: str) -> tuple[AbstractFileSystem, str]:
        """The filesystem that holds `location`, and its path there."""
        if not is_remote(location):
            if self._local is None:
                from fsspec.implementations.local import LocalFileSystem

                self._local = LocalFileSystem()
            return self._local, location
        if self._s3fs is None:
            self._s3fs = self._s3_filesystem()
        path = location.removeprefix(S3)
        bucket = path.split("/", 1)[0]
        if bucket not in self._checked_buckets:  # once per bucket: a clear error before anything else
            try:
                with self._errors(location):
                    self._s3fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError as exc:
                raise StorageError(f"{location}: bucket {bucket!r} does not exist at {self.endpoint()}") from exc
            self._checked_buckets.add(bucket)
        return self._s3fs, path

    def _s3_filesystem(self) -> AbstractFileSystem:
        import s3fs

        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,  # credentials are read when a store is made, never reused stale
            use_listings_cache=False,  # another host may have written since: always list afresh
            config_kwargs={
                "connect_timeout": self.timeout_s,
                "read_timeout": self.timeout_s,
                "retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"},
            },
        )
        fs.retries = 1  # botocore retries (above); no second layer of retries around it
        return fs

    @contextmanager
    def _errors(self, location: str) -> Iterator[None]:
        """Turn filesystem and S3 client errors into messages that name `location` and say what to check."""
        from botocore.exceptions import BotoCoreError, NoCredentialsError

        try:
            yield
        except NotFound:
            raise
        except FileExistsError as exc:
            raise PreconditionFailed(f"{location}: already exists") from exc
        except FileNotFoundError as exc:
            if _s3_error_code(exc) == "NoSuchBucket":
                bucket = location.removeprefix(S3).split("/", 1)[0]
                raise StorageError(f"{location}: bucket {bucket!r} does not exist at {self.endpoint()}") from exc
            raise NotFound(location) from exc
        except PermissionError as exc:
            if not is_remote(location):
                raise StorageError(f"{location}: permission denied") from exc
            raise StorageError(
                f"{location}: access denied by {self.endpoint()} ({exc}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, and that they may use this bucket"
            ) from exc
        except NoCredentialsError as exc:
            raise StorageError(
                f"{location}: no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from exc
        except BotoCoreError as exc:  # connection refused, timeouts, DNS: after S3_ATTEMPTS attempts
            raise Unreachable(
                f"{location}: cannot reach the object store at {self.endpoint()} after {S3_ATTEMPTS} attempts "
                f"({type(exc).__name__}: {exc}); check AWS_ENDPOINT_URL and the network"
            ) from exc
        except OSError as exc:
            if _s3_error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise PreconditionFailed(f"{location}: changed by another writer") from exc
            raise StorageError(f"{location}: {exc.strerror or exc}") from exc

    def endpoint(self) -> str:
        """The S3 endpoint in use (AWS_ENDPOINT_URL, or AWS's own); for messages."""
        client = getattr(self._s3fs, "s3", None)
        return getattr(getattr(client, "meta", None), "endpoint_url", None) or os.environ.get(
            "AWS_ENDPOINT_URL", "the default AWS endpoint"
        )

    def prune_scratch(self) -> int:
        """Delete this host's scratch copies unused for `SCRATCH_KEPT_S`; how many (none without scratch)."""
        return Scratch(self.scratch).prune() if self.scratch else 0

    def require_scratch(self, location: str) -> Path:
        if self.scratch is None:
            raise StorageError(f"{location}: reading remote files needs a scratch folder on this host")
        return self.scratch

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, location: str) -> bool:
        fs, path = self._fs(location)
        with self._errors(location):
            return fs.exists(path)

    def read_bytes(self, location: str) -> bytes:
        """The file's content; FileNotFoundError (naming it) if there is none."""
        if not is_remote(location):
            with self._errors(location), _open_local(location) as f:
                return f.read()
        fs, path = self._fs(location)
        with self._errors(location):
            try:
                return fs.cat_file(path)
            except IsADirectoryError as exc:
                raise NotFound(location, "is a folder, not a file") from exc

    def read_json(self, location: str) -> Any:
        data = self.read_bytes(location)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise IntegrityError(f"{location}: not valid JSON ({exc})") from exc

    def read_versioned(self, location: str) -> tuple[bytes, str] | None:
        """The file's content and its etag (what `replace` compares), or None if there is no file."""
        fs, path = self._fs(location)
        if not is_remote(location):
            try:
                with self._errors(location), _open_local(location) as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return data, hashlib.sha256(data).hexdigest()
        from s3fs.utils import FileExpired

        while True:
            with self._errors(location):
                try:
                    # s3fs reads with If-Match on the etag it saw first, so data and etag belong together.
                    with fs.open(path, "rb") as f:
                        return f.read(), f.details["ETag"]
                except FileNotFoundError:
                    return None
                except FileExpired:
                    continue  # replaced between the etag and the read: read the new one

    def is_dir(self, location: str) -> bool:
        fs, path = self._fs(location)
        with self._errors(location):
            return fs.isdir(path)

    def listdir(self, location: str) -> list[str]:
        """Names of the files and folders directly in `location` (none if it does not exist).

        In a bucket a folder is there while it holds an object (some servers list emptied ones too).
        """
        if is_remote(location):
            return sorted({name.split("/", 1)[0] for name in self.find(location)})
        fs, path = self._fs(location)
        with self._errors(location):
            try:
                entries = fs.ls(path, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})

    def find(self, location: str) -> list[str]:
        """Paths, relative to `location`, of every file below it."""
        fs, path = self._fs(location)
        with self._errors(location):
            return sorted(_below(path, fs.find(path)))

    def last_modified(self, location: str) -> datetime | None:
        """When a file at or below `location` last changed; None if there is none."""
        fs, path = self._fs(location)
        with self._errors(location):
            found = fs.find(path, detail=True)
        times = [
            info["LastModified"] if "LastModified" in info else datetime.fromtimestamp(info["mtime"], UTC)
            for info in found.values()
        ]
        return max(times, default=None)

    def iter_chunks(self, location: str) -> Iterator[bytes]:
        with self._errors(location), self._open(location) as f:
            while chunk := f.read(_CHUNK):
                yield chunk

    def _open(self, location: str) -> Any:
        if not is_remote(location):
            return _open_local(location)
        fs, path = self._fs(location)
        return fs.open(path, "rb")

    def sha256(self, location: str) -> str:
        digest = hashlib.sha256()
        for chunk in self.iter_chunks(location):
            digest.update(chunk)
        return digest.hexdigest()

    def local_copy(self, file: StoredFile) -> Path:
        """A local file with `file`'s verified content: the file itself on disk, else a scratch copy.

        A scratch copy is reused only while the stored object is the one it was made from (same etag),
        and only after it hashes right again. Raises FileNotFoundError if the file is missing and
        IntegrityError if it does not hash to `file.sha256`.
        """
        if not is_remote(file.location):
            path = Path(file.location)
            if not path.is_file():
                raise NotFound(file.location)
            _verify(path, file)
            return path
        fs, path = self._fs(file.location)
        with self._errors(file.location):
            etag = fs.info(path)["ETag"]
        scratch = Scratch(self.require_scratch(file.location))
        if cached := scratch.get(file, etag):
            return cached
        target = scratch.path(file)
        self.fetch(file, target)
        scratch.remember(file, etag)
        return target

    def fetch(self, file: StoredFile, target: Path) -> None:
        """Download `file` to the local `target` (whole, atomically) if its content verifies; else raise."""
        fs, path = self._fs(file.location)
        with atomic_path(target) as tmp, self._errors(file.location):
            fs.get_file(path, str(tmp))
            _verify(tmp, file)

    @contextmanager
    def local_tree(self, location: str, max_bytes: int | None = None, max_files: int | None = None) -> Iterator[Path]:
        """The folder `location` as a local folder: itself on disk, else a temporary download of it
        (refused before any download if it holds more than `max_bytes`, or more than `max_files` files,
        or a key that is no name inside it, or a name that is both a file and a folder)."""
        if not is_remote(location):
            yield Path(location)
            return
        fs, path = self._fs(location)
        with self._errors(location):
            found = fs.find(path, detail=True)  # one listing: the names and their sizes
        below = _below(path, found)
        if max_files is not None and len(below) > max_files:
            raise TooLarge(f"{location}: {len(below):,} files, over the {max_files:,}-file limit for this folder")
        if max_bytes is not None and (total := sum(found[key]["size"] for key in below.values())) > max_bytes:
            raise TooLarge(f"{location}: {total:,} bytes, over the {max_bytes:,}-byte limit for this folder")
        names = sorted(below)
        for name in names:
            name_parts(location, name)
        folders = {name.rsplit("/", depth)[0] for name in names for depth in range(1, name.count("/") + 1)}
        if clashing := sorted(folders & set(names)):
            raise StorageError(
                f"{join(location, clashing[0])}: both a file and a folder in this bucket, which no disk can hold"
            )
        tmp_root = self.require_scratch(location) / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_root) as folder:
            if names:
                local = [str(Path(folder, *name.split("/"))) for name in names]
                with self._errors(location):
                    fs.get([join(path, name) for name in names], local)
            yield Path(folder)

    # --- writes -----------------------------------------------------------------------------------

    def write_bytes(self, location: str, data: bytes) -> None:
        """Publish `data` at `location`, replacing what is there, in one step."""
        fs, path = self._fs(location)
        if not is_remote(location):
            atomic_write_bytes(Path(path), data)
            return
        with self._errors(location):
            fs.pipe_file(path, data)

    def write_json(self, location: str, value: Any) -> None:
        self.write_bytes(location, json.dumps(value, indent=1).encode())

    def create(self, location: str, data: bytes) -> None:
        """Publish `data` at `location` only if nothing is there; else raise PreconditionFailed.

        A location that already holds exactly `data` was created by this writer: its answer was lost and
        the retry (botocore's, or aiohttp's own on a dropped connection) met its own write. So `data`
        must say whose it is (a token, a time), or another writer's equal bytes pass for this one's.
        """
        try:
            self._create(location, data)
        except PreconditionFailed:
            if not self._holds(location, data):
                raise

    def _create(self, location: str, data: bytes) -> None:
        if is_remote(location):
            fs, path = self._fs(location)
            try:
                with self._errors(location):
                    fs.pipe_file(path, data, mode="create")
            except PreconditionFailed as exc:  # some servers do not say which precondition failed
                raise PreconditionFailed(f"{location}: already exists") from exc.__cause__
            return
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

    def replace(self, location: str, data: bytes, etag: str | None) -> None:
        """Publish `data` only if `location` still has `etag` (None: if it still does not exist).

        As with `create`, a location that already holds exactly `data` was replaced by this writer.
        """
        if etag is None:
            self.create(location, data)
            return
        try:
            self._replace(location, data, etag)
        except PreconditionFailed:
            if not self._holds(location, data):
                raise

    def _replace(self, location: str, data: bytes, etag: str) -> None:
        if is_remote(location):
            fs, path = self._fs(location)
            with self._errors(location):
                fs.pipe_file(path, data, IfMatch=etag)
            return
        target = Path(location)
        with open(target.with_name(f".{target.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            current = self.read_versioned(location)
            if current is None or current[1] != etag:
                raise PreconditionFailed(f"{location}: changed by another writer")
            atomic_write_bytes(target, data)

    def _holds(self, location: str, data: bytes) -> bool:
        """Whether `location` holds exactly `data` now."""
        current = self.read_versioned(location)
        return current is not None and current[0] == data

    @contextmanager
    def staged(self, location: str) -> Iterator[Path]:
        """Yield a local path to write; if the block succeeds, publish that file at `location` whole.

        On S3 the written file is kept as this host's verified scratch copy of its content.
        """
        if not is_remote(location):
            with atomic_path(Path(location)) as tmp:
                yield tmp
            return
        tmp_root = self.require_scratch(location) / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_root) as folder:
            tmp = Path(folder) / posixpath.basename(location)
            yield tmp
            self.publish(tmp, location)

    def publish(self, local: Path, location: str) -> StoredFile:
        """Publish the local file at `location` (whole) and return it with its sha256.

        On S3 a copy is kept in this host's scratch folder, so reading it back here needs no download.
        """
        stored = StoredFile(location, sha256_file(local))
        if not is_remote(location):
            if Path(location) != local:
                self.put_file(local, location)
            return stored
        self.put_file(local, location)
        fs, path = self._fs(location)
        with self._errors(location):
            etag = fs.info(path)["ETag"]
        scratch = Scratch(self.require_scratch(location))
        if not scratch.path(stored).is_file():
            with atomic_path(scratch.path(stored)) as tmp:
                shutil.copyfile(local, tmp)
        scratch.remember(stored, etag)
        return stored

    def put_file(self, local: Path, location: str) -> None:
        """Copy a local file to `location` whole, replacing what is there."""
        fs, path = self._fs(location)
        if not is_remote(location):
            with atomic_path(Path(path)) as tmp:
                shutil.copyfile(local, tmp)
            return
        with self._errors(location):
            fs.put_file(str(local), path)

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

        Names are literal. On disk one rename. In a bucket each object is copied, the copies are
        listed and checked against the originals' sizes, and only then are the originals deleted (a
        crash in between leaves both, never neither; a failed copy leaves the source as it was).
        """
        if is_remote(source) != is_remote(target):
            raise StorageError(f"{source} -> {target}: a move stays on one store")
        if self.exists(target) or self.find(target):
            raise PreconditionFailed(f"{target}: already exists")
        if not is_remote(source):
            if not os.path.lexists(source):
                raise NotFound(source)
            make_dirs(Path(target).parent)
            with self._errors(source):
                shutil.move(source, target)  # a rename, or a copy where the target is on another disk
            fsync_path(Path(target).parent)
            fsync_path(Path(source).parent)
            return
        fs, path = self._fs(source)
        _, target_path = self._fs(target)
        objects = self._objects(source)
        if not objects:
            raise NotFound(source)
        copies = {key: target_path + key.removeprefix(path) for key in objects}
        try:
            with self._errors(source):
                for key, copy in copies.items():
                    fs.cp_file(key, copy)  # one object, by its literal key
            arrived = self._objects(target)
            if missing := [c for k, c in copies.items() if arrived.get(c, {}).get("size") != objects[k]["size"]]:
                raise StorageError(f"{S3}{missing[0]}: the copy did not arrive whole; {source} is left as it was")
        except BaseException:
            with contextlib.suppress(Exception):
                self._delete_objects(target, [c for c in copies.values()])
            raise
        self._delete_objects(source, list(objects))

    def delete(self, location: str) -> None:
        """Remove a file or a folder and all it holds (names are literal); nothing there is not an error."""
        if not is_remote(location):
            path = Path(location)
            with self._errors(location):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            return
        self._delete_objects(location, list(self._objects(location)))

    def _objects(self, location: str) -> dict[str, dict]:
        """The objects of a bucket location: the key itself and every key below it, by key, with details."""
        fs, path = self._fs(location)
        with self._errors(location):
            found = fs.find(path, detail=True)  # a prefix listing: literal
        return {key: info for key, info in found.items() if key == path or key.startswith(path + "/")}

    def _delete_objects(self, location: str, keys: list[str]) -> None:
        fs, path = self._fs(location)
        bucket = path.split("/", 1)[0]
        for start in range(0, len(keys), 1000):  # S3 deletes at most 1,000 keys a request
            objects = [{"Key": key.split("/", 1)[1]} for key in keys[start : start + 1000]]
            with self._errors(location):
                answer = fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            if errors := answer.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"{S3}{bucket}/{first.get('Key')}: could not be deleted ({first.get('Code')}: "
                    f"{first.get('Message')}); {len(errors)} of {len(objects)} keys left"
                )


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
