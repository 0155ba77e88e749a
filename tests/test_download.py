"""Downloads from local, HTTP (on 127.0.0.1) and S3 mirrors into a data root on disk or in a bucket:
verification, fallback, retries, the verified cache."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.states import Failed
from pydantic import ValidationError

from flows.params import RetrainParams
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import DownloadError, TransientDownloadError, download_dataset
from fmnist.storage import Store, join
from fmnist.storage.files import sha256_file
from fmnist.storage.layout import DataLayout
from tasks.download import retry_if_transient
from tests.conftest import QuietHandler


def corrupt_copy(mirror_dir: Path, dest: Path, how: str) -> Path:
    """A copy of the mirror where the training images are damaged in one way."""
    shutil.copytree(mirror_dir, dest)
    target = dest / "train-images-idx3-ubyte.gz"
    good = target.read_bytes()
    if how == "truncated":
        target.write_bytes(good[: len(good) // 2])
    elif how == "not-gzip":
        target.write_bytes(gzip.decompress(good))
    elif how == "other-content":
        raw = bytearray(gzip.decompress(good))
        raw[-1] ^= 0xFF
        target.write_bytes(gzip.compress(bytes(raw)))
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "missing":
        target.unlink()
    return dest


def test_local_mirror_as_path_and_file_url(
    mirror: tuple[Path, DatasetSpec], data_layout: DataLayout, store: Store
) -> None:
    folder, spec = mirror
    for source in (str(folder), folder.as_uri()):
        store.delete(data_layout.root)
        raw = download_dataset(spec, [source], store, data_layout.raw)
        assert [f.path for f in raw.files] == [join(data_layout.raw, r.raw_name) for r in spec.files]
        assert all(store.sha256(f.path) == r.sha256 for f, r in zip(raw.files, spec.files, strict=True))
        assert {f.source for f in raw.files} == {source}


def test_http_mirror(mirror, layout, store, http_mirror_of) -> None:
    folder, spec = mirror
    url = http_mirror_of(folder)
    raw = download_dataset(spec, [url], store, layout.raw)
    assert {f.source for f in raw.files} == {url}
    assert sha256_file(Path(raw.train_images.path)) == spec.train_images.sha256


def test_s3_mirror(mirror, layout, store, bucket, s3_env) -> None:
    folder, spec = mirror
    s3_env.filesystem().put(str(folder) + "/", bucket.removeprefix("s3://") + "/mirror/", recursive=True)
    missing = f"{bucket}/no-mirror-here/"
    raw = download_dataset(spec, [missing, f"{bucket}/mirror/"], store, layout.raw)
    assert {f.source for f in raw.files} == {f"{bucket}/mirror/"}
    assert sha256_file(Path(raw.train_images.path)) == spec.train_images.sha256


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "truncated gzip stream"),
        ("not-gzip", "not a valid gzip stream"),
        ("other-content", "does not match the pinned"),
        ("empty", "empty file"),
        ("missing", "HTTP 404"),
    ],
)
def test_bad_mirror_falls_back_to_the_next(
    mirror, layout, store, http_mirror_of, tmp_path, caplog, how, reason
) -> None:
    folder, spec = mirror
    bad = http_mirror_of(corrupt_copy(folder, tmp_path / "bad", how))
    good = http_mirror_of(folder)
    with caplog.at_level(logging.WARNING):
        raw = download_dataset(spec, [bad, good], store, layout.raw)
    assert raw.train_images.source == good
    assert raw.train_labels.source == bad  # undamaged files still come from the first mirror
    assert any(reason in r.getMessage() and "train-images" in r.getMessage() for r in caplog.records)


def test_all_mirrors_bad_names_each_and_leaves_no_file(mirror, data_layout, store, http_mirror_of, tmp_path) -> None:
    folder, spec = mirror
    truncated = http_mirror_of(corrupt_copy(folder, tmp_path / "t", "truncated"))
    local_bad = corrupt_copy(folder, tmp_path / "o", "other-content")
    with pytest.raises(DownloadError) as caught:
        download_dataset(spec, [truncated, str(local_bad), str(tmp_path / "nowhere")], store, data_layout.raw)
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz: no mirror served a verified copy" in message
    assert f"{truncated}train-images-idx3-ubyte.gz: truncated gzip stream" in message
    assert f"{local_bad}/train-images-idx3-ubyte.gz: sha256" in message
    assert "nowhere/train-images-idx3-ubyte.gz: not found" in message
    # Nothing half-written anywhere: not in the data root, and no temp file beside it.
    assert [n for n in store.find(data_layout.root) if "train-images" in n] == []
    assert not [p for p in (tmp_path / "data").rglob(".part-*")]


def test_stalled_server_times_out_and_falls_back_at_once(
    mirror, layout, store, stalling_server, http_mirror_of, caplog
):
    folder, spec = mirror
    good = http_mirror_of(folder)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        raw = download_dataset(spec, [stalling_server, good], store, layout.raw, timeout_s=0.3)
    assert {f.source for f in raw.files} == {good}
    stalled = [r.getMessage() for r in caplog.records if r.getMessage().startswith(stalling_server)]
    # One attempt a file: retrying is the task's business, after every mirror was tried.
    assert len(stalled) == 4 and all("timed out after 0.3 s" in m for m in stalled)
    assert time.perf_counter() - started < 30  # a stall costs one timeout per file, not forever


def test_only_failures_that_may_pass_make_the_task_retry(mirror, layout, store, tmp_path) -> None:
    _, spec = mirror
    with pytest.raises(TransientDownloadError, match=r"127.0.0.1:9/train-images-idx3-ubyte.gz: network error"):
        download_dataset(spec, ["http://127.0.0.1:9/", str(tmp_path / "nowhere")], store, layout.raw, timeout_s=1)
    with pytest.raises(DownloadError) as caught:
        download_dataset(spec, [str(tmp_path / "nowhere")], store, layout.raw)
    assert not isinstance(caught.value, TransientDownloadError)
    assert retry_if_transient(None, None, Failed(data=TransientDownloadError("a time-out")))
    assert not retry_if_transient(None, None, Failed(data=DownloadError("sha256 does not match")))
    assert not retry_if_transient(None, None, Failed(data=ValueError("a bug")))


def test_verified_cache_is_reused_without_any_mirror(mirror, data_layout, store, tmp_path) -> None:
    folder, spec = mirror
    download_dataset(spec, [str(folder)], store, data_layout.raw)
    # Another host: nothing in its scratch folder, the files come from the data root, verified.
    elsewhere = Store(scratch=tmp_path / "other-host")
    raw = download_dataset(spec, ["http://127.0.0.1:9/unreachable/"], elsewhere, data_layout.raw, timeout_s=0.1)
    assert {f.source for f in raw.files} == {"cache"}


def test_damaged_cache_file_is_downloaded_again(mirror, data_layout, store, tmp_path) -> None:
    folder, spec = mirror
    raw = download_dataset(spec, [str(folder)], store, data_layout.raw)
    store.write_bytes(raw.test_images.path, b"damaged")
    elsewhere = Store(scratch=tmp_path / "other-host")
    again = download_dataset(spec, [str(folder)], elsewhere, data_layout.raw)
    assert again.test_images.source == str(folder)
    assert store.sha256(again.test_images.path) == spec.test_images.sha256


def test_unsupported_scheme_is_refused_before_downloading(mirror, layout, store) -> None:
    _, spec = mirror
    with pytest.raises(ValueError, match=r"mirror 'ftp://example.org/': unsupported scheme 'ftp'"):
        download_dataset(spec, ["ftp://example.org/"], store, layout.raw)
    assert not Path(layout.raw).exists()


# --- hostile mirrors: each is left for the next mirror within a bounded time and number of bytes ----


class _Hostile(QuietHandler):
    """Answers every GET with 200 and what `body` yields, for at most 30 s (a test's server must stop)."""

    def body(self) -> Iterator[bytes]:
        raise NotImplementedError

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        ends = time.monotonic() + 30
        try:
            for data in self.body():
                self.wfile.write(data)
                if time.monotonic() > ends:
                    return
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what these tests want


class _GoodFileThenEndlessZeros(_Hostile):
    def body(self) -> Iterator[bytes]:
        yield (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        while True:
            yield bytes(1 << 16)


class _EndlessGzipOfZeros(_Hostile):
    def body(self) -> Iterator[bytes]:
        packer = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        while True:
            yield packer.compress(bytes(1 << 20))


class _EndlessEmptyDeflateBlocks(_Hostile):
    """A gzip header, then empty stored blocks forever: never any output, never the end of the stream."""

    def body(self) -> Iterator[bytes]:
        yield gzip.compress(b"")[:10]
        while True:
            yield b"\x00\x00\x00\xff\xff" * 4096


class _Dripping(_Hostile):
    def body(self) -> Iterator[bytes]:
        for byte in gzip.compress(bytes(1 << 20)):
            time.sleep(0.05)
            yield bytes([byte])


class _RedirectLoop(QuietHandler):
    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.path)
        self.end_headers()


class _BadContentEncoding(QuietHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", "20")
        self.end_headers()
        self.wfile.write(b"this is not gzip....")


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (_EndlessGzipOfZeros, "decompresses to more than the expected"),
        (_EndlessEmptyDeflateBlocks, r"sent more than [\d,]+ bytes for a file of"),
        (_Dripping, r"still sending after 1 s \(the download deadline\)"),
        (_RedirectLoop, "TooManyRedirects"),
        (_BadContentEncoding, "DecodingError"),
    ],
    ids=["gzip-bomb", "endless-empty-blocks", "dripping", "redirect-loop", "bad-content-encoding"],
)
def test_a_hostile_mirror_is_left_for_the_next_one(
    mirror, layout, store, serve_with, http_mirror_of, caplog, handler, message: str
) -> None:
    folder, spec = mirror
    hostile, good = serve_with(handler, folder), http_mirror_of(folder)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        raw = download_dataset(spec, [hostile, good], store, layout.raw, timeout_s=5, deadline_s=1)
    assert {f.source for f in raw.files} == {good}
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert re.search(f"{hostile}train-images-idx3-ubyte.gz: .*{message}", warnings), warnings
    assert time.perf_counter() - started < 30


def test_reading_stops_at_the_end_of_the_gzip_stream(mirror, layout, store, serve_with) -> None:
    folder, spec = mirror
    endless = serve_with(_GoodFileThenEndlessZeros, folder)
    started = time.perf_counter()
    raw = download_dataset(spec, [endless], store, layout.raw, timeout_s=5, deadline_s=20)
    assert {f.source for f in raw.files} == {endless}  # verified: what came after the stream was never read
    assert time.perf_counter() - started < 15


def test_a_local_mirror_that_is_or_names_a_fifo_is_left_at_once(mirror, layout, store, tmp_path) -> None:
    """A FIFO blocks whoever opens it: such a mirror hung the download forever, deadline and timeout aside,
    with heartbeats flowing, so no automation fired."""
    folder, spec = mirror
    named = tmp_path / "names-fifos"
    shutil.copytree(folder, named)
    (named / "train-images-idx3-ubyte.gz").unlink()
    os.mkfifo(named / "train-images-idx3-ubyte.gz")
    os.mkfifo(tmp_path / "is-a-fifo")
    outcome: list[object] = []

    def download() -> None:
        try:
            download_dataset(spec, [str(named), str(tmp_path / "is-a-fifo")], store, layout.raw)
        except DownloadError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=download, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the download waited on a FIFO"
    [error] = outcome
    assert f"{named}/train-images-idx3-ubyte.gz: a FIFO, not a regular file" in str(error)
    assert f"{tmp_path}/is-a-fifo/train-images-idx3-ubyte.gz" in str(error)


@pytest.mark.parametrize(
    "url", ["http://operator:s3cr3t@127.0.0.1:1/mirror/", "https://token-s3cr3t@mirror.example/fmnist/"]
)
def test_a_mirror_url_with_credentials_is_refused_without_showing_them(mirror, layout, store, url: str) -> None:
    """Credentials in a mirror URL reached the log, the download artifact and the webhook's failure message."""
    _, spec = mirror
    with pytest.raises(ValueError, match="credentials do not belong in a mirror URL") as refused:
        download_dataset(spec, [url], store, layout.raw)
    assert "s3cr3t" not in str(refused.value) and "<credentials>@" in str(refused.value)
    with pytest.raises(ValidationError) as invalid:
        RetrainParams(mirrors=[url])
    assert "s3cr3t" not in str(invalid.value) and "credentials do not belong in a mirror URL" in str(invalid.value)


@pytest.mark.parametrize("suffix", ["?", "?v=2", "#", "#/../decoy"])
def test_a_mirror_url_with_a_query_or_fragment_is_refused(mirror, layout, store, tmp_path, suffix: str) -> None:
    """`file:///srv/mirror?x` read `/srv/mirror` for every file (the name went into the query): another file."""
    import shutil

    folder, spec = mirror
    for url in (folder.as_uri() + suffix, "http://127.0.0.1:1/mirror" + suffix, "s3://bucket/mirror" + suffix):
        with pytest.raises(ValueError, match=r"URL takes no query or fragment"):
            download_dataset(spec, [url], store, layout.raw)
        with pytest.raises(ValidationError, match=r"URL takes no query or fragment"):
            RetrainParams(mirrors=[url])
    assert not Path(layout.raw).exists()
    odd = tmp_path / "mirror?copy#1"  # a folder whose name holds them: a path, or a URL that escapes them
    shutil.copytree(folder, odd)
    for source in (str(odd), odd.as_uri()):
        assert "%3F" in odd.as_uri() and "%23" in odd.as_uri()
        raw = download_dataset(spec, [source], store, layout.raw)
        assert {f.source for f in raw.files} == {source}
        shutil.rmtree(layout.raw)
