"""Hostile or odd files in the incoming folder and the readers of untrusted bytes: each is refused with
an error naming the file, within a memory ceiling and a time bound, and nothing stored changes."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.data import idx, incoming
from fmnist.data.idx import IdxFormatError, encode_idx
from fmnist.data.incoming import IncomingBatchError, add_batch, collect_incoming, known_images, screen_incoming
from fmnist.data.png import ImageFileError, read_grayscale_png
from fmnist.storage import Store, StoredFile
from tests.helpers import ROOT, synthetic_images, write_idx_batch, write_mirror

MEMORY_CEILING_MB = 100  # each bomb below would cost 300 MB or more if it were decoded


def peak_rss_growth_mb(code: str, timeout_s: float = 60) -> tuple[str, float]:
    """Run `code` in a fresh interpreter (after importing the readers) and report what it printed and how
    much its peak resident memory grew while it ran."""
    script = f"""
import resource, sys
import numpy, PIL.Image
from fmnist.data import idx, incoming, png
from fmnist.storage import Store
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
{"".join(f"    {line}" + chr(10) for line in code.strip().splitlines())}
except Exception as exc:
    print(f"{{type(exc).__name__}}: {{exc}}")
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=True
    )
    output, _, growth = done.stdout.rpartition("GROWTH_KB ")
    return output, int(growth) / 1024


def chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bytes(width: int, height: int, idat: list[bytes], crcs: list[int | None] | None = None) -> bytes:
    """A grayscale PNG built chunk by chunk, so its header and data can disagree."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    crcs = crcs or [None] * len(idat)
    body = b"".join(chunk(b"IDAT", data, crc) for data, crc in zip(idat, crcs, strict=True))
    return b"\x89PNG\r\n\x1a\n" + header + body + chunk(b"IEND", b"")


def zeros_deflated(rows: int, row_bytes: int) -> bytes:
    """Deflated scanlines of zeros (a filter byte and `row_bytes` pixels each): ~1000x smaller than decoded."""
    packer = zlib.compressobj(9)
    line = bytes(row_bytes + 1)
    return b"".join(packer.compress(line) for _ in range(rows)) + packer.flush()


def one_batch_error(incoming_dir: Path) -> str:
    with pytest.raises((IncomingBatchError, IdxFormatError)) as caught:
        collect_incoming(Store(), str(incoming_dir))
    return str(caught.value)


# --- memory bombs ---------------------------------------------------------------------------------


def test_a_gzip_bomb_idx_file_is_not_decompressed_beyond_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    packer = zlib.compressobj(9, wbits=16 + zlib.MAX_WBITS)
    head = encode_idx(np.zeros((5, 28, 28), dtype=np.uint8))
    zeros = bytes(1 << 20)
    path.write_bytes(packer.compress(head) + b"".join(packer.compress(zeros) for _ in range(400)) + packer.flush())
    assert path.stat().st_size < 600_000  # 400 MB of zeros after the five images it claims
    output, growth = peak_rss_growth_mb(f"idx.read_images(__import__('pathlib').Path({str(path)!r}))")
    assert f"{path}: more than 1,048,576 unexpected bytes after the data of shape (5, 28, 28)" in output
    assert growth < MEMORY_CEILING_MB, f"peak memory grew {growth:.0f} MB"


def test_an_idx_header_claiming_gigabytes_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">I3I", idx.IMAGES_MAGIC, 4_000_000, 28, 28)))
    with pytest.raises(IdxFormatError, match=r"claims shape \(4000000, 28, 28\) \(3,136,000,000 bytes\), over the"):
        idx.read_images(path)


def test_a_png_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(12_000, 12_000, [zeros_deflated(12_000, 12_000)]))
    assert path.stat().st_size < 200_000  # 144 MB of pixels, more when decoded to RGB or float
    output, growth = peak_rss_growth_mb(f"png.read_grayscale_png(__import__('pathlib').Path({str(path)!r}))")
    assert f"{path}: image is 12000x12000, over the 65,536-pixel limit" in output
    assert growth < MEMORY_CEILING_MB, f"peak memory grew {growth:.0f} MB"


def test_a_png_over_pillows_own_bomb_limit_gets_the_projects_error(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_bytes(30_000, 30_000, [zeros_deflated(2, 28)]))
    with pytest.raises(ImageFileError, match=r"huge.png: not a readable PNG image \(DecompressionBombError"):
        read_grayscale_png(path)


def test_an_oversized_png_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(28, 28, [zeros_deflated(28, 28)]) + bytes(2 << 20))
    with pytest.raises(ImageFileError, match=r"big.png: 2,097,\d+ bytes, over the 1,048,576-byte limit"):
        read_grayscale_png(path)


# --- files that are not regular files -------------------------------------------------------------


def test_a_symlink_to_dev_zero_is_refused_without_reading_it(tmp_path: Path) -> None:
    batch = tmp_path / "in" / "b"
    write_idx_batch(batch, synthetic_images(np.arange(3, dtype=np.uint8), seed=20), np.arange(3, dtype=np.uint8))
    (batch / "batch-images-idx3-ubyte.gz").unlink()
    (batch / "batch-images-idx3-ubyte").symlink_to("/dev/zero")
    code = f"incoming.collect_incoming(Store(), {str(tmp_path / 'in')!r})"
    output, growth = peak_rss_growth_mb(code, timeout_s=30)  # a read of /dev/zero would never end
    assert "b/batch-images-idx3-ubyte: a symbolic link; a batch holds only real files and folders" in output
    assert growth < MEMORY_CEILING_MB
    code = f"idx.read_images(__import__('pathlib').Path({str(batch / 'batch-images-idx3-ubyte')!r}))"
    output, growth = peak_rss_growth_mb(code, timeout_s=30)  # the reader alone refuses it too
    assert "batch-images-idx3-ubyte: cannot read file (a symbolic link; only regular files are read)" in output


def test_a_fifo_is_refused_instead_of_blocking_the_run(tmp_path: Path) -> None:
    batch = tmp_path / "in" / "b"
    write_idx_batch(batch, synthetic_images(np.arange(3, dtype=np.uint8), seed=20), np.arange(3, dtype=np.uint8))
    (batch / "batch-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(batch / "batch-labels-idx1-ubyte")
    output, _ = peak_rss_growth_mb(f"incoming.collect_incoming(Store(), {str(tmp_path / 'in')!r})", timeout_s=30)
    assert "batch-labels-idx1-ubyte: cannot read file (a FIFO, not a regular file)" in output


def test_a_class_folder_linked_from_outside_incoming_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "bag"
    outside.mkdir(parents=True)
    Image.new("L", (28, 28)).save(outside / "0.png")
    (tmp_path / "in" / "b").mkdir(parents=True)
    (tmp_path / "in" / "b" / "bag").symlink_to(outside)
    assert "in/b/bag: a symbolic link; a batch holds only real files and folders" in one_batch_error(tmp_path / "in")


def test_a_batch_folder_linked_from_outside_incoming_is_refused(tmp_path: Path) -> None:
    labels = np.arange(3, dtype=np.uint8)
    write_idx_batch(tmp_path / "elsewhere", synthetic_images(labels, seed=20), labels)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b").symlink_to(tmp_path / "elsewhere")
    assert "in/b: a symbolic link" in one_batch_error(tmp_path / "in")


# --- what counts as a PNG, and which files a class folder may hold --------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "TIFF", "GIF"])
def test_other_image_formats_named_png_are_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(path, format=fmt)
    with pytest.raises(ImageFileError, match=r"x.png: not a PNG image \(it does not start with the PNG signature\)"):
        read_grayscale_png(path)


def test_a_png_with_a_damaged_second_data_chunk_is_refused(tmp_path: Path) -> None:
    data = zeros_deflated(28, 28)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(28, 28, [data[:10], data[10:]], crcs=[None, 12345]))
    with pytest.raises(ImageFileError, match=r"x.png: not a readable PNG image \(SyntaxError: broken PNG file"):
        read_grayscale_png(path)
    path.write_bytes(png_bytes(28, 28, [data[:10], b"\xff" * 40]))
    with pytest.raises(ImageFileError, match=r"x.png: not a readable PNG image \(OSError"):
        read_grayscale_png(path)


def test_hidden_files_are_ignored_and_extensions_match_in_any_case(tmp_path: Path) -> None:
    bag = tmp_path / "in" / "b" / "bag"
    bag.mkdir(parents=True)
    Image.new("L", (28, 28), color=1).save(bag / "lower.png")
    Image.new("L", (28, 28), color=2).save(bag / "UPPER.PNG")
    (bag / "._lower.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (bag / ".DS_Store").write_bytes(b"Bud1")
    [batch] = collect_incoming(Store(), str(tmp_path / "in"))
    assert batch.rows == 2
    (bag / "notes.txt").write_text("which shoes are these?")
    assert "bag/notes.txt: not a .png file; a class folder holds only PNG images" in one_batch_error(tmp_path / "in")


def test_idx_file_names_match_in_any_case(tmp_path: Path) -> None:
    labels = np.arange(4, dtype=np.uint8)
    folder = write_idx_batch(tmp_path / "in" / "b", synthetic_images(labels, seed=20), labels)
    for path in folder.iterdir():
        path.rename(path.with_name(path.name.upper()))
    [batch] = collect_incoming(Store(), str(tmp_path / "in"))
    assert (batch.kind, batch.rows) == ("idx", 4)


def test_an_empty_idx_batch_is_named(tmp_path: Path) -> None:
    empty = np.zeros((0, 28, 28), dtype=np.uint8)
    write_idx_batch(tmp_path / "in" / "b", empty, np.zeros(0, dtype=np.uint8))
    assert "in/b/batch-images-idx3-ubyte.gz: holds no items (shape (0, 28, 28))" in one_batch_error(tmp_path / "in")


def test_a_batch_over_the_row_limit_is_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(incoming, "MAX_BATCH_ROWS", 3)
    bag = tmp_path / "in" / "b" / "bag"
    bag.mkdir(parents=True)
    for i in range(4):
        (bag / f"{i}.png").write_bytes(b"never decoded")
    assert "in/b: 4 images, over the 3-image limit per batch" in one_batch_error(tmp_path / "in")


# --- the test set must stay unseen ----------------------------------------------------------------


@pytest.fixture
def canonical(tmp_path: Path) -> tuple[Store, StoredFile, StoredFile, np.ndarray]:
    spec = write_mirror(tmp_path / "mirror", train_per_class=5, test_per_class=3, seed=30)
    raw = tmp_path / "raw"
    raw.mkdir()
    files = []
    for remote in (spec.test_images, spec.train_images):
        (raw / remote.raw_name).write_bytes(gzip.decompress((tmp_path / "mirror" / remote.name).read_bytes()))
        files.append(StoredFile(str(raw / remote.raw_name), remote.sha256))
    test_images = idx.read_images(Path(files[0].location))
    return Store(), files[0], files[1], test_images


def test_a_batch_holding_test_images_is_refused_by_add_batch_and_by_the_run(tmp_path: Path, canonical) -> None:
    store, test, train, test_images = canonical
    known = known_images(store, test, train)
    labels = np.arange(6, dtype=np.uint8)
    images = synthetic_images(labels, seed=40)
    images[4] = test_images[7]
    source = write_idx_batch(tmp_path / "leaky", images, labels)
    with pytest.raises(
        IncomingBatchError,
        match=r"leaky: 1 of its 6 images are copies of test-set images \(its "
        r"image 4 is test image 7\)",
    ):
        add_batch(store, source, str(tmp_path / "in"), known=known)
    assert not (tmp_path / "in").exists()  # nothing copied

    (tmp_path / "in").mkdir()
    source.rename(tmp_path / "in" / "leaky")
    screening = screen_incoming(store, str(tmp_path / "in"), known_images(store, test, train), contract=False)
    assert screening.batches == [] and "is test image 7" in screening.refused[0].error


def test_repeated_batches_are_refused_and_training_images_reported(tmp_path: Path, canonical) -> None:
    store, test, train, _ = canonical
    train_images = idx.read_images(Path(train.location))
    labels = np.arange(5, dtype=np.uint8)
    images = synthetic_images(labels, seed=41)
    images[:2] = train_images[:2]
    write_idx_batch(tmp_path / "in" / "a", images, labels)
    write_idx_batch(tmp_path / "in" / "b", images, labels)
    screening = screen_incoming(store, str(tmp_path / "in"), known_images(store, test, train), contract=False)
    assert [b.name for b in screening.batches] == ["a"]
    assert screening.repeats == ["a: 2 of its 5 images are already in the training set"]  # reported, not refused
    [repeat] = screening.refused  # the same images twice: each would count twice
    assert repeat.name == "b" and "5 of its 5 images are already in a batch used before it (5 in batch a" in (
        repeat.error
    )


def test_a_quarantined_batch_moves_whole_with_its_error_in_a_bucket(tmp_path: Path, store: Store, bucket: str) -> None:
    labels = np.arange(3, dtype=np.uint8)
    folder = write_idx_batch(tmp_path / "bad", synthetic_images(labels, seed=42), labels)
    (folder / "batch-labels-idx1-ubyte.gz").write_bytes(b"junk")
    for path in folder.iterdir():
        store.put_file(path, f"{bucket}/in/bad/{path.name}")
    screening = screen_incoming(store, f"{bucket}/in", contract=False)
    [refused] = screening.refused
    where = incoming.quarantine(store, refused, f"{bucket}/quarantine", "by the test")
    assert store.listdir(f"{bucket}/in") == []
    assert sorted(store.find(where)) == [
        "QUARANTINED.txt",
        "batch-images-idx3-ubyte.gz",
        "batch-labels-idx1-ubyte.gz",
    ]
    note = store.read_bytes(f"{where}/QUARANTINED.txt").decode()
    assert f"{bucket}/in/bad/batch-labels-idx1-ubyte.gz: not a gzip file" in note and "by the test" in note


def test_a_batch_in_a_bucket_too_big_to_download_is_refused_first(
    tmp_path: Path, store: Store, bucket: str, monkeypatch
) -> None:
    monkeypatch.setattr(incoming, "MAX_BATCH_BYTES", 1000)
    labels = np.arange(3, dtype=np.uint8)
    folder = write_idx_batch(tmp_path / "big", synthetic_images(labels, seed=43), labels)
    for path in folder.iterdir():
        store.put_file(path, f"{bucket}/in/big/{path.name}")
    store.write_bytes(f"{bucket}/in/big/padding.bin", bytes(2000))
    [refused] = screen_incoming(store, f"{bucket}/in", contract=False).refused
    assert refused.error.startswith(f"{bucket}/in/big: ") and "bytes, over the 1,000-byte limit" in refused.error
    assert not list((tmp_path / "scratch").rglob("padding.bin"))  # nothing was downloaded
