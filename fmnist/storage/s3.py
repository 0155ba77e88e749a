"""S3 buckets as a storage backend, through s3fs (any S3 API: AWS, SeaweedFS, MinIO, Ceph).

Whole or absent: one PUT (or a completed multipart upload), which readers see whole or not at all.
Create-only: `If-None-Match: *`. Compare-and-swap: `If-Match` on the etag read. Names are literal:
listings are prefix listings, and copies and deletes go key by key (fsspec's `copy`, `mv`, `rm` and
`expand_path` glob on S3, so they are not used). Copies of objects are kept in the host's scratch
folder (`fmnist.storage.scratch`), named by their hash and re-hashed before every use. Every request
has a timeout and `S3_ATTEMPTS` attempts; credentials and the endpoint come from the AWS chain.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from fmnist.storage.base import (
    FileStamp,
    NotFound,
    PreconditionFailed,
    StorageError,
    StoredFile,
    TooLarge,
    Unreachable,
    below,
    join,
    name_parts,
    refuse_credentials,
    refuse_query,
    verify,
)
from fmnist.storage.files import atomic_path
from fmnist.storage.scratch import Scratch, require_scratch, temporary_folder

if TYPE_CHECKING:
    from datetime import datetime

    from fsspec import AbstractFileSystem

S3 = "s3://"
S3_ATTEMPTS = 3  # per request, with botocore's exponential backoff; s3fs adds no retry layer of its own


@cache
def service_models(data_path: str | None):
    """botocore's loader of the S3 API's definitions (its JSON models) from `data_path` (AWS_DATA_PATH, or the
    config file's data_path) and botocore's own, one for every store of the process that names the same
    path: a new session loaded and parsed them again, 0.09 of the 0.11 CPU-s a store's first request took.
    (Models added to those folders later are read by the next process.)"""
    from botocore.loaders import create_loader

    return create_loader(data_path)


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code ('NoSuchBucket', 'PreconditionFailed', ...) behind an s3fs exception."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code") or str(
                response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            )
    return None


class S3Backend:
    """`s3://bucket/key` locations. `scratch` holds this host's verified copies of objects; `timeout_s`
    bounds each request's connection and each read."""

    def __init__(self, scratch: Path | None, timeout_s: float) -> None:
        self.scratch = scratch
        self.timeout_s = timeout_s
        self._s3fs: AbstractFileSystem | None = None
        self._making = threading.Lock()  # threads' first requests at once make one filesystem, not one each
        self._checked_buckets: set[str] = set()

    @staticmethod
    def normalize(location: str) -> str:
        """`s3://bucket[/key]` without a trailing slash; no credentials, query or fragment."""
        parts = urllib.parse.urlsplit(location)
        refuse_credentials(
            location, "storage", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment instead"
        )
        if not parts.netloc:
            raise StorageError(f"{location!r}: no bucket name (expected s3://bucket/prefix)")
        refuse_query(location, "storage", "a key holding '?' or '#' cannot be a storage location")
        return f"{S3}{parts.netloc}/{parts.path.strip('/')}".rstrip("/")

    # --- the filesystem and its errors -----------------------------------------------------------------

    def _path(self, location: str) -> str:
        """`location`'s path in s3fs (`bucket/key`), its bucket checked once: a clear error first."""
        with self._making:
            if self._s3fs is None:
                self._s3fs = self._filesystem()
        path = location.removeprefix(S3)
        bucket = path.split("/", 1)[0]
        if bucket not in self._checked_buckets:
            try:
                with self._errors(location):
                    self._s3fs.call_s3("head_bucket", Bucket=bucket)
            except FileNotFoundError as exc:
                raise StorageError(f"{location}: bucket {bucket!r} does not exist at {self.endpoint()}") from exc
            self._checked_buckets.add(bucket)
        return path

    @property
    def _fs(self) -> AbstractFileSystem:
        assert self._s3fs is not None, "_path() makes the filesystem"
        return self._s3fs

    def _filesystem(self) -> AbstractFileSystem:
        import s3fs
        from aiobotocore.session import AioSession

        # A store's own session: credentials, the endpoint and the region are read at its first request,
        # never reused stale from another store's.
        session = AioSession()
        session.register_component("data_loader", service_models(session.get_config_variable("data_path")))
        fs = s3fs.S3FileSystem(
            session=session,
            skip_instance_cache=True,
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
        """Turn s3fs and S3 client errors into messages that name `location` and say what to check."""
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

    def _etag(self, location: str) -> str:
        path = self._path(location)
        with self._errors(location):
            return self._fs.info(path)["ETag"]

    # --- reads ------------------------------------------------------------------------------------

    def exists(self, location: str) -> bool:
        path = self._path(location)
        with self._errors(location):
            return self._fs.exists(path)

    def is_dir(self, location: str) -> bool:
        path = self._path(location)
        with self._errors(location):
            return self._fs.isdir(path)

    def read_bytes(self, location: str) -> bytes:
        path = self._path(location)
        with self._errors(location):
            try:
                return self._fs.cat_file(path)
            except IsADirectoryError as exc:
                raise NotFound(location, "is a folder, not a file") from exc

    def read_versioned(self, location: str) -> tuple[bytes, str] | None:
        from s3fs.utils import FileExpired

        path = self._path(location)
        while True:
            with self._errors(location):
                try:
                    # s3fs reads with If-Match on the etag it saw first, so data and etag belong together.
                    with self._fs.open(path, "rb") as f:
                        return f.read(), f.details["ETag"]
                except FileNotFoundError:
                    return None
                except FileExpired:
                    continue  # replaced between the etag and the read: read the new one

    def chunks(self, location: str, size: int) -> Iterator[bytes]:
        path = self._path(location)
        with self._errors(location), self._fs.open(path, "rb") as f:
            while chunk := f.read(size):
                yield chunk

    def listdir(self, location: str) -> list[str]:
        """In a bucket a folder is there while it holds an object (some servers list emptied ones too)."""
        return sorted({name.split("/", 1)[0] for name in self.find(location)})

    def find(self, location: str, max_depth: int | None = None) -> list[str]:
        """One prefix listing (deeper keys are listed too, and left out)."""
        path = self._path(location)
        with self._errors(location):
            return sorted(below(path, self._fs.find(path), max_depth))

    def last_modified(self, location: str) -> datetime | None:
        return max((info["LastModified"] for info in self._objects(location).values()), default=None)

    def stamps(self, location: str) -> dict[str, FileStamp]:
        """Size, ETag and LastModified: the server sets both on every write (the ETag from the content),
        so a stamp is settled from the start (no `changed_ns`)."""
        path = self._path(location)
        return {
            "" if key == path else key.removeprefix(path + "/"): FileStamp(
                (info["size"], info.get("ETag"), str(info.get("LastModified")))
            )
            for key, info in self._objects(location).items()
        }

    # --- writes -----------------------------------------------------------------------------------

    def write_bytes(self, location: str, data: bytes) -> None:
        path = self._path(location)
        with self._errors(location):
            self._fs.pipe_file(path, data)

    def put_file(self, local: Path, location: str) -> None:
        path = self._path(location)
        with self._errors(location):
            self._fs.put_file(str(local), path)

    def create(self, location: str, data: bytes) -> None:
        path = self._path(location)
        try:
            with self._errors(location):
                self._fs.pipe_file(path, data, mode="create")
        except PreconditionFailed as exc:  # some servers do not say which precondition failed
            raise PreconditionFailed(f"{location}: already exists") from exc.__cause__

    def replace(self, location: str, data: bytes, etag: str) -> None:
        path = self._path(location)
        with self._errors(location):
            self._fs.pipe_file(path, data, IfMatch=etag)

    def delete(self, location: str) -> None:
        self._delete_objects(location, list(self._objects(location)))

    def move(self, source: str, target: str) -> None:
        """Each object copied, the copies listed and checked against the originals' sizes, and only then
        the originals deleted: a crash in between leaves both, never neither; a failed copy leaves the
        source as it was."""
        path, target_path = self._path(source), self._path(target)
        objects = self._objects(source)
        if not objects:
            raise NotFound(source)
        copies = {key: target_path + key.removeprefix(path) for key in objects}
        try:
            with self._errors(source):
                for key, copy in copies.items():
                    self._fs.cp_file(key, copy)  # one object, by its literal key
            arrived = self._objects(target)
            if missing := [c for k, c in copies.items() if arrived.get(c, {}).get("size") != objects[k]["size"]]:
                raise StorageError(f"{S3}{missing[0]}: the copy did not arrive whole; {source} is left as it was")
        except BaseException:
            with contextlib.suppress(Exception):
                self._delete_objects(target, list(copies.values()))
            raise
        self._delete_objects(source, list(objects))

    def _objects(self, location: str) -> dict[str, dict]:
        """The key `location` and every key below it, by key, with details (a literal prefix listing)."""
        path = self._path(location)
        with self._errors(location):
            found = self._fs.find(path, detail=True)
        return {key: info for key, info in found.items() if key == path or key.startswith(path + "/")}

    def _delete_objects(self, location: str, keys: list[str]) -> None:
        bucket = self._path(location).split("/", 1)[0]
        for start in range(0, len(keys), 1000):  # S3 deletes at most 1,000 keys a request
            objects = [{"Key": key.split("/", 1)[1]} for key in keys[start : start + 1000]]
            with self._errors(location):
                answer = self._fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            if errors := answer.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"{S3}{bucket}/{first.get('Key')}: could not be deleted ({first.get('Code')}: "
                    f"{first.get('Message')}); {len(errors)} of {len(objects)} keys left"
                )

    # --- local copies: verified, in the scratch folder -------------------------------------------------

    def direct_path(self, location: str) -> None:
        return None

    def local_copy(self, file: StoredFile) -> Path:
        """A scratch copy, reused only while the object is the one it was made from (same etag), and
        only after it hashes right again."""
        etag = self._etag(file.location)
        copies = Scratch(require_scratch(self.scratch, file.location))
        if cached := copies.get(file, etag):
            return cached
        target = copies.path(file)
        self.fetch(file, target)
        copies.remember(file, etag)
        return target

    def fetch(self, file: StoredFile, target: Path) -> None:
        path = self._path(file.location)
        with atomic_path(target) as tmp, self._errors(file.location):
            self._fs.get_file(path, str(tmp))
            verify(tmp, file)

    @contextmanager
    def local_tree(self, location: str, max_bytes: int | None, max_files: int | None) -> Iterator[Path]:
        """A temporary download, refused before it starts if it is over the limits, holds a key that is no
        name inside it, or a name that is both a file and a folder."""
        path = self._path(location)
        found = self._objects(location)  # one listing: the names and their sizes
        inner = below(path, found)
        if max_files is not None and len(inner) > max_files:
            raise TooLarge(f"{location}: {len(inner):,} files, over the {max_files:,}-file limit for this folder")
        if max_bytes is not None and (total := sum(found[key]["size"] for key in inner.values())) > max_bytes:
            raise TooLarge(f"{location}: {total:,} bytes, over the {max_bytes:,}-byte limit for this folder")
        names = sorted(inner)
        for name in names:
            name_parts(location, name)
        folders = {name.rsplit("/", depth)[0] for name in names for depth in range(1, name.count("/") + 1)}
        if clashing := sorted(folders & set(names)):
            raise StorageError(
                f"{join(location, clashing[0])}: both a file and a folder in this bucket, which no disk can hold"
            )
        with temporary_folder(self.scratch, location) as folder:
            if names:
                local = [str(Path(folder, *name.split("/"))) for name in names]
                with self._errors(location):
                    self._fs.get([join(path, name) for name in names], local)
            yield Path(folder)

    def keep_copy(self, local: Path, stored: StoredFile) -> None:
        """Keep the file just published as this host's scratch copy: reading it back needs no download."""
        etag = self._etag(stored.location)
        copies = Scratch(require_scratch(self.scratch, stored.location))
        if not copies.path(stored).is_file():
            with atomic_path(copies.path(stored)) as tmp:
                shutil.copyfile(local, tmp)
        copies.remember(stored, etag)
