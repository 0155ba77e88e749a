"""Download stage: fetch the IDX files from the first mirror that serves a verified copy.

Each file streams through a gzip decompressor and sha256 into a temp file that is published in the
raw folder (on disk or in a bucket) only once its decompressed size and hash match the pinned ones.
A file already there that verifies is reused without touching any mirror. A mirror is a local path,
a `file://`, `http(s)://` or `s3://` URL of a folder holding the `.gz` files.
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from fmnist.data.dataset import DatasetSpec, RemoteFile
from fmnist.storage import (
    IntegrityError,
    StorageError,
    Store,
    StoredFile,
    join,
    normalize,
    refuse_credentials,
    refuse_query,
)

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """No mirror served a verified copy of a file."""


class TransientDownloadError(DownloadError):
    """No mirror served a verified copy, and at least one failed in a way that may pass (a time-out, a
    dropped connection, HTTP 429 or 5xx): the download task is retried later, with backoff."""


class _Unverified(Exception):
    """The mirror answered, but with content that is not the pinned file (no point retrying)."""


class _Transient(Exception):
    """A network failure that may pass: worth trying this mirror again later."""


@dataclass(frozen=True)
class VerifiedFile:
    path: str  # its location in the data root: a local path or an s3:// URL
    sha256: str
    source: str  # the mirror it came from, or "cache"

    @property
    def file(self) -> StoredFile:
        return StoredFile(self.path, self.sha256)


@dataclass(frozen=True)
class RawDataset:
    """The four verified, decompressed IDX files of the canonical dataset."""

    train_images: VerifiedFile
    train_labels: VerifiedFile
    test_images: VerifiedFile
    test_labels: VerifiedFile

    @property
    def files(self) -> tuple[VerifiedFile, ...]:
        return (self.train_images, self.train_labels, self.test_images, self.test_labels)


def _file_url(mirror: str, name: str) -> str:
    return mirror.rstrip("/") + "/" + name


def _is_http(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme.lower() in ("http", "https")


def check_mirror(mirror: str) -> None:
    """Refuse (ValueError) a mirror of an unsupported scheme, one with credentials in its URL, or a mirror
    URL with a query or a fragment: a file's URL is the mirror's with `/<file name>` added, which would
    land in the query or fragment, and every file would be read from one other place."""
    try:
        if _is_http(mirror):
            refuse_credentials(
                mirror, "mirror", "serve the mirror without them, or from a bucket (s3://, AWS_* variables)"
            )
            refuse_query(mirror, "mirror", "give the URL of the folder holding the .gz files, nothing after it")
        else:
            normalize(mirror)
    except StorageError as exc:
        raise ValueError(f"mirror {exc}") from None


def _read_chunks(location: str, timeout_s: float, store: Store) -> Iterator[bytes]:
    if not _is_http(location):
        try:
            yield from store.iter_chunks(normalize(location))
        except (FileNotFoundError, StorageError) as exc:  # the store already retried what was worth it
            raise _Unverified(str(exc).removeprefix(f"{normalize(location)}: ")) from exc
        return
    try:
        with httpx.stream("GET", location, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code == 429 or response.status_code >= 500:
                raise _Transient(f"HTTP {response.status_code}")
            if response.status_code != 200:
                raise _Unverified(f"HTTP {response.status_code}")
            yield from response.iter_bytes()  # as it arrives: the deadline is checked between reads
    except httpx.TimeoutException as exc:
        raise _Transient(f"timed out after {timeout_s:g} s ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise _Transient(f"network error ({type(exc).__name__}: {exc})") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # redirect loops, bad content encodings: next mirror
        raise _Unverified(f"{type(exc).__name__}: {exc}") from exc


def _stream_verified(chunks: Iterator[bytes], remote: RemoteFile, out: Path, deadline_s: float) -> None:
    """Decompress `chunks` into `out`, raising _Unverified unless size and sha256 match.

    Whatever the mirror sends, this reads at most `max_received(remote)` bytes for at most
    `deadline_s` seconds (plus one read timeout), inflates no more than the pinned size, and stops
    reading at the end of the gzip stream: a hostile mirror cannot fill the disk or memory or hold
    the run. These failures move on to the next mirror.
    """
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip container only
    digest = hashlib.sha256()
    size = received = 0
    limit = max_received(remote)
    started = time.monotonic()
    with open(out, "wb") as f:
        for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise _Unverified(f"sent more than {limit:,} bytes for a file of {remote.raw_size:,}")
            if time.monotonic() - started > deadline_s:
                raise _Unverified(f"still sending after {deadline_s:g} s (the download deadline)")
            pending = chunk
            while pending and not inflater.eof:
                try:
                    # Bounded: one more byte than the pinned size is enough to know it is too big.
                    data = inflater.decompress(pending, remote.raw_size - size + 1)
                except zlib.error as exc:
                    raise _Unverified(f"not a valid gzip stream ({exc})") from exc
                size += len(data)
                if size > remote.raw_size:
                    raise _Unverified(f"decompresses to more than the expected {remote.raw_size:,} bytes")
                digest.update(data)
                f.write(data)
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break  # whatever a mirror sends after the stream's end is not read (it could be endless)
    if received == 0:
        raise _Unverified("empty file")
    if not inflater.eof:
        raise _Unverified(f"truncated gzip stream ({size:,} of {remote.raw_size:,} bytes after decompression)")
    if size != remote.raw_size:
        raise _Unverified(f"decompressed size {size:,} bytes, expected {remote.raw_size:,}")
    if digest.hexdigest() != remote.sha256:
        raise _Unverified(f"sha256 {digest.hexdigest()} does not match the pinned {remote.sha256}")


def max_received(remote: RemoteFile) -> int:
    """The most bytes a mirror may send for `remote`: gzip never grows data by more than a fraction of 1%."""
    return remote.raw_size + remote.raw_size // 100 + (1 << 20)


def fetch_verified(
    remote: RemoteFile,
    mirrors: Sequence[str],
    store: Store,
    raw_dir: str,
    *,
    timeout_s: float = 30.0,
    deadline_s: float = 900.0,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> VerifiedFile:
    """The decompressed, verified file in `raw_dir`, from the cache or the first good mirror."""
    target = join(raw_dir, remote.raw_name)
    try:
        store.local_copy(StoredFile(target, remote.sha256))
        return VerifiedFile(target, remote.sha256, "cache")
    except FileNotFoundError:
        pass
    except IntegrityError:
        logger.warning("%s: stored copy does not verify; downloading it again", target)
    failures: list[str] = []
    transient = False
    for mirror in mirrors:
        url = _file_url(mirror, remote.name)
        started = time.perf_counter()
        try:
            with store.staged(target) as tmp:
                _stream_verified(_read_chunks(url, timeout_s, store), remote, tmp, deadline_s)
        except _Transient as exc:  # the next mirror now; this one again on the task's retry
            transient = True
            failures.append(f"{url}: {exc}")
        except _Unverified as exc:
            failures.append(f"{url}: {exc}")
        else:
            logger.info(
                "%s: %s bytes verified from %s in %.2f s",
                remote.raw_name,
                f"{remote.raw_size:,}",
                mirror,
                time.perf_counter() - started,
            )
            return VerifiedFile(target, remote.sha256, mirror)
        logger.warning("%s", failures[-1])
    if not failures:
        raise DownloadError(f"{remote.name}: no mirrors given")
    error = TransientDownloadError if transient else DownloadError
    raise error(f"{remote.name}: no mirror served a verified copy; tried:\n  - " + "\n  - ".join(failures))


def download_dataset(
    spec: DatasetSpec,
    mirrors: Sequence[str],
    store: Store,
    raw_dir: str,
    *,
    timeout_s: float = 30.0,
    deadline_s: float = 900.0,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> RawDataset:
    """All four files of `spec`, each verified."""
    for mirror in mirrors:
        check_mirror(mirror)  # reject unsupported schemes and credentials before any download starts
    fetched = [
        fetch_verified(
            remote,
            mirrors,
            store,
            raw_dir,
            timeout_s=timeout_s,
            deadline_s=deadline_s,
            logger=logger,
        )
        for remote in spec.files
    ]
    return RawDataset(*fetched)
