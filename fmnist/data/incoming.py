"""New labeled data: batches dropped in the incoming folder join the training set.

Each batch is a folder of its own under the incoming folder (a local folder or an s3:// prefix), in
one of two forms:
- an IDX pair: one `*images-idx3-ubyte[.gz]` and one `*labels-idx1-ubyte[.gz]` file;
- PNG images (28x28, 8-bit grayscale) in one sub-folder per class, named by the class
  (`t-shirt-top`, `trouser`, ..., `ankle-boot`; case, spaces and `_` are forgiven) or its index.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import logging
import posixpath
import re
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fmnist.data import idx, overlap
from fmnist.data.dataset import CLASS_NAMES, CLASS_SLUGS, FASHION_MNIST, NUM_CLASSES, class_slug
from fmnist.data.overlap import KnownImages
from fmnist.data.png import ImageFileError, read_grayscale_png
from fmnist.storage import (
    IntegrityError,
    PreconditionFailed,
    Stamp,
    StorageError,
    Store,
    StoredFile,
    TooLarge,
    join,
)
from fmnist.storage.files import printable, sha256_text

if TYPE_CHECKING:
    from fmnist.data.download import RawDataset

log = logging.getLogger(__name__)
# Present while `add_batch` copies a batch in: runs leave such a folder alone.
INCOMPLETE = ".incomplete"
QUARANTINE_NOTE = "QUARANTINED.txt"  # beside a quarantined batch: why it was refused
# What a run does with a batch it cannot use: stop, or move it aside and train on the rest.
BadBatches = Literal["fail", "quarantine"]
BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # the whole name; runs and add-batch alike
BATCH_NAME_RULE = "a batch name is up to 100 letters, digits, '.', '_' and '-', starting with a letter or digit"
# Split big deliveries into several batches: this bounds a run's memory per batch (78 MB of pixels).
MAX_BATCH_ROWS = 100_000
MAX_BATCH_BYTES = 512 << 20  # a batch in a bucket is downloaded whole before it is read: at most this
# Counted from the listing, before a download: one file per PNG image, and room for a few stray files.
MAX_BATCH_FILES = MAX_BATCH_ROWS + 100
QUARANTINE_ATTEMPTS = 10  # target names tried when a quarantine folder of the same name and second exists
# What only a batch holds: an IDX file (`*images-idx3-ubyte[.gz]`, ...) or a PNG image. An entry of the
# incoming folder with none of them (nor the `.incomplete` marker) is no batch, and is left alone.
BATCH_FILE = re.compile(r"(idx\d-ubyte(\.gz)?|\.png)$", re.IGNORECASE)
USED = "used"  # beside the receipts: <content sha256>.json for each batch content screening let through first
SHA256 = re.compile(r"[0-9a-f]{64}")
RECEIPT_VERSION = "2"  # what a screening receipt holds; receipts of another version are not read
RETRY = "make retrain-now"  # how an operator starts a run (docs/operations.md)


class IncomingBatchError(ValueError):
    """A batch folder that cannot be read; the message names the folder or file."""


class BatchLayoutError(IncomingBatchError):
    """A folder not laid out as a batch (no class folders, no IDX pair): maybe no batch at all, such as a
    home folder's `Pictures/`. Refused, and never moved to quarantine."""


@dataclass(frozen=True)
class IncomingBatch:
    name: str
    path: str  # its location: a local folder or an s3:// prefix
    kind: Literal["idx", "png"]
    sha256: str  # of the decoded images and labels: same content, same hash, whatever the encoding
    rows: int
    receipt: str | None = None  # the screening receipt that vouches for it, if any (see `screen_incoming`)


def check_batch_name(name: str) -> None:
    if not BATCH_NAME.fullmatch(name):
        raise IncomingBatchError(f"{printable(repr(name))}: not a batch name; {BATCH_NAME_RULE}")


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def _entries(folder: Path) -> list[Path]:
    """What `folder` holds, in name order, without hidden files (`.DS_Store`, macOS's `._x.png`, ...)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _one(entries: list[Path], folder: Path, suffix: str) -> Path | None:
    """The one entry whose name ends in `suffix` or `suffix.gz`, in any case."""
    found = [p for p in entries if p.name.lower().removesuffix(".gz").endswith(suffix)]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise BatchLayoutError(f"{folder}: more than one file matches *{suffix}[.gz]: {names}")
    return found[0] if found else None


def _real_folder(path: Path) -> bool:
    """A folder, and not through a symbolic link (which could lead anywhere, outside incoming/ too)."""
    if path.is_symlink():
        raise BatchLayoutError(f"{path}: a symbolic link; a batch holds only real files and folders")
    return path.is_dir()


def _class_index(folder: Path) -> int:
    name = folder.name
    if name.isdigit() and int(name) < NUM_CLASSES:
        return int(name)
    try:
        return CLASS_SLUGS.index(class_slug(name))
    except ValueError:
        raise BatchLayoutError(
            f"{folder}: not a class name; use one of {', '.join(CLASS_SLUGS)} or 0-{NUM_CLASSES - 1}"
        ) from None


def _png_files(class_dirs: list[Path]) -> list[tuple[Path, int]]:
    """A PNG batch's files with their classes, in the order of its rows."""
    return [(png, _class_index(class_dir)) for class_dir in class_dirs for png in _entries(class_dir)]


def image_names(folder: Path, kind: Literal["idx", "png"]) -> list[str] | None:
    """What each row of the batch in `folder` is, for errors: its file (None: an IDX batch's rows are numbers)."""
    if kind == "idx":
        return None
    return [str(png.relative_to(folder)) for png, _ in _png_files([p for p in _entries(folder) if _real_folder(p)])]


def _read_png_batch(folder: Path, class_dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    files = _png_files(class_dirs)
    if len(files) > MAX_BATCH_ROWS:
        raise IncomingBatchError(f"{folder}: {len(files):,} images, over the {MAX_BATCH_ROWS:,}-image limit per batch")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for png, label in files:
        if png.suffix.lower() != ".png":
            raise BatchLayoutError(f"{png}: not a .png file; a class folder holds only PNG images")
        try:
            image = read_grayscale_png(png)
        except ImageFileError as exc:
            raise IncomingBatchError(str(exc)) from exc
        if images and image.shape != images[0].shape:
            raise IncomingBatchError(
                f"{png}: image is {image.shape[1]}x{image.shape[0]}, unlike the "
                f"{images[0].shape[1]}x{images[0].shape[0]} images before it in {folder}"
            )
        images.append(image)
        labels.append(label)
    if not images:
        raise BatchLayoutError(f"{folder}: class folders hold no .png files")
    return np.stack(images), np.asarray(labels, dtype=np.uint8)


def load_batch(folder: Path) -> tuple[Literal["idx", "png"], np.ndarray, np.ndarray]:
    """The batch's kind, its (n, rows, columns) uint8 images and (n,) labels."""
    if not _real_folder(folder):
        raise IncomingBatchError(f"{folder}: not a folder")
    entries = _entries(folder)
    images_file = _one(entries, folder, "images-idx3-ubyte")
    labels_file = _one(entries, folder, "labels-idx1-ubyte")
    class_dirs = [p for p in entries if _real_folder(p)]
    if images_file and labels_file and not class_dirs:
        images, labels = idx.read_pair(images_file, labels_file)
        if len(labels) > MAX_BATCH_ROWS:
            raise IncomingBatchError(
                f"{images_file}: {len(labels):,} images, over the {MAX_BATCH_ROWS:,}-image limit per batch"
            )
        return "idx", images, labels
    if class_dirs and not (images_file or labels_file):
        return "png", *_read_png_batch(folder, class_dirs)
    error = IncomingBatchError if images_file or labels_file else BatchLayoutError  # an IDX file: a batch's
    raise error(
        f"{folder}: a batch holds either one *images-idx3-ubyte[.gz] file with one "
        "*labels-idx1-ubyte[.gz] file, or PNG images in one folder per class"
    )


def read_batch(store: Store, location: str) -> tuple[Literal["idx", "png"], np.ndarray, np.ndarray]:
    """`load_batch` of a batch wherever it is stored; errors name the stored location."""
    with contextlib.ExitStack() as stack:
        try:
            folder = stack.enter_context(store.local_tree(location, MAX_BATCH_BYTES, MAX_BATCH_FILES))
        except (TooLarge, StorageError) as exc:  # too big, or keys no folder on disk can hold
            raise IncomingBatchError(str(exc)) from exc
        try:
            return load_batch(folder)
        except (IncomingBatchError, idx.IdxFormatError) as exc:
            if folder == Path(location):
                raise
            error = BatchLayoutError if isinstance(exc, BatchLayoutError) else IncomingBatchError
            raise error(str(exc).replace(str(folder), location)) from exc


@dataclass(frozen=True)
class RefusedBatch:
    name: str  # printable (see `printable`): it goes into logs, artifacts and events
    path: str  # the stored location as it is, which may hold bytes that are not UTF-8
    error: str
    layout: bool = False  # not laid out as a batch (`BatchLayoutError`): never moved to quarantine


@dataclass(frozen=True)
class Screening:
    """The batches a run may use, those it may not (and why), and repeated images worth knowing about."""

    batches: list[IncomingBatch]
    refused: list[RefusedBatch]
    repeats: list[str]  # one line per batch that repeats images of the canonical training set
    ignored: list[str] = field(default_factory=list)  # entries that are no batch (see `BATCH_FILE`): left alone

    def ignored_message(self, incoming_dir: str) -> str | None:
        """One line naming the entries left alone as no batch (None: there are none)."""
        if not self.ignored:
            return None
        names = ", ".join(self.ignored[:10]) + (f" and {len(self.ignored) - 10} more" if len(self.ignored) > 10 else "")
        return (
            f"{incoming_dir}: {len(self.ignored)} entries hold no batch (no IDX file, no PNG image), left untouched: "
            f"{names}; is storage.incoming_dir the incoming folder?"
        )

    def raise_for_refused(self) -> None:
        if len(self.refused) == 1:
            raise IncomingBatchError(self.refused[0].error)
        if self.refused:
            raise IncomingBatchError(
                f"{len(self.refused)} incoming batches refused:\n  - " + "\n  - ".join(r.error for r in self.refused)
            )


def test_set_copies_error(
    location: str, images: np.ndarray, known: KnownImages, names: list[str] | None = None
) -> str | None:
    """Why a batch that repeats test-set images may not be trained on (None: it repeats none). `names`:
    each row's file, where the rows are files."""
    found = overlap.copies(images, known.test)
    if not found:
        return None
    row, test_row = found[0]
    image = names[row] if names else row
    return (
        f"{location}: {len(found):,} of its {len(images):,} images are copies of test-set images (its image "
        f"{image} is test image {test_row}); training on them would inflate the test accuracy the gate relies on"
    )


@dataclass(frozen=True)
class _Passed:
    """A batch that passed its own checks, with its images' digests and labels for the checks across batches."""

    batch: IncomingBatch
    in_training: int | None  # how many of its images the canonical training set holds
    digests: np.ndarray  # (rows, 16) uint8: `overlap.digest_array`
    labels: np.ndarray
    known_before: bool  # passed an earlier run's screening (its receipt vouched for it)


def is_batch_file(name: str) -> bool:
    """Whether a file of this name is one only a batch holds (an IDX file, a PNG image)."""
    return bool(BATCH_FILE.search(name))


def holds_batch_files(names: list[str], is_link: Callable[[str], bool]) -> bool:
    """Whether a folder holding `names` (its files' paths, two names deep) is a batch, good or bad: it holds
    the `.incomplete` marker, an IDX file or a PNG image (hidden ones aside), or a link named as a class
    folder (a listing shows a link as a file; a plain file named like a class, `Documents/1`, is no sign)."""
    return any(
        name == INCOMPLETE
        or (is_batch_file(name) and not any(part.startswith(".") for part in name.split("/")))
        or ("/" not in name and _is_class_name(name) and is_link(name))
        for name in names
    )


def _is_class_name(name: str) -> bool:
    return (name.isdigit() and int(name) < NUM_CLASSES) or class_slug(name) in CLASS_SLUGS


def _local_link(store: Store, location: str) -> bool:
    """A symbolic link on disk (a bucket has none)."""
    path = store.direct_path(location)
    return path is not None and path.is_symlink()


def screen_incoming(
    store: Store,
    incoming_dir: str,
    known: KnownImages | None = None,
    *,
    contract: bool = True,
    receipts: str | None = None,
    outcomes: str | None = None,
) -> Screening:
    """Every batch in `incoming_dir` (which may not exist: then there are none), by folder name, read and
    checked: readable, no test-set images (with `known`), its contract suite passed (with `contract`),
    and no image that an earlier batch holds (see `_first_copies`).

    An entry that is no batch (it holds no IDX file, no PNG image and no `.incomplete` marker: a home
    folder's `Documents/`, a `notes.zip`) is left where it is, untouched, and named in `ignored`. A batch
    that `add_batch` is still copying (its `.incomplete` marker is there) is not a batch yet.

    Batches are read one at a time and let go, so memory is that of the largest batch, plus 17 bytes an
    image of every batch for the check across batches. With `receipts` (a folder), a batch that passed
    its own checks leaves a receipt there, keyed by its files' stamp (`Store.stamp`) and what it was
    checked against, holding its content hash and its images' digests and labels; a later run finds the
    receipt and does not read the batch again, so a run's screening costs the batches that are new or
    changed, plus one listing a batch. A receipt vouches only for what its stamp can see: one written
    while the stamp was not settled (a batch written in the last seconds) also holds the hash of the
    batch's files, and is trusted only while they hash the same. With `outcomes` (the validation stage's
    folder of kept outcomes), a batch's contract outcome is kept there, and the validation stage does not
    judge the batch again.
    """
    from fmnist.data.contract import failure_message, incoming_check, kept_outcomes, run_checks, suite_version

    passed: list[_Passed] = []
    refused: list[RefusedBatch] = []
    ignored: list[str] = []
    for name in store.listdir(incoming_dir):
        if name.startswith("."):
            continue
        entry = join(incoming_dir, name)
        try:
            if not store.is_dir(entry):
                if not is_batch_file(name):
                    ignored.append(printable(name))
                    continue
                raise IncomingBatchError(
                    f"{printable(entry)}: put each batch in a folder of its own: {incoming_dir}/<batch-name>/"
                )
            names = store.find(entry, max_depth=2)
            if not holds_batch_files(names, lambda name, entry=entry: _local_link(store, join(entry, name))):
                ignored.append(printable(name))
                continue
            if INCOMPLETE in names:
                log.warning(
                    "%s: still being added (or the copy was interrupted): left out of this run", printable(entry)
                )
                continue
            check_batch_name(name)
            receipt = stamp = None
            if receipts and known and contract and (stamp := store.stamp(entry)):
                key = sha256_text("screened", RECEIPT_VERSION, suite_version(), known.identity, name, stamp.digest)
                receipt = join(receipts, f"{key}.json")
                if kept := _receipt(store, receipt, name, entry, stamp):
                    passed.append(kept)
                    continue
            # An unsettled stamp cannot see a write in its clock tick: the files are hashed before they
            # are read, and the receipt is written only if they still hash the same after.
            files_before = _files_sha256(store, entry) if stamp and not stamp.settled else None
            kind, images, labels = read_batch(store, entry)
        except (IncomingBatchError, idx.IdxFormatError) as exc:
            refused.append(RefusedBatch(printable(name), entry, printable(str(exc)), isinstance(exc, BatchLayoutError)))
            continue
        if known and (error := test_set_copies_error(entry, images, known)):
            refused.append(RefusedBatch(name, entry, error))
            continue
        batch = IncomingBatch(name, entry, kind, content_sha256(images, labels), len(labels), receipt)
        if contract:
            check = [incoming_check(name, images, labels)]
            if outcomes:
                inputs = (suite_version(), check[0].suite, batch.sha256)
                judged = kept_outcomes(store, outcomes, inputs, lambda check=check: check)
            else:
                with tempfile.TemporaryDirectory(prefix="fmnist-batches-") as results:
                    judged = run_checks(check, Path(results))
            del check
            if not judged[0].success:
                refused.append(RefusedBatch(name, entry, f"{entry}: {failure_message(judged)}"))
                continue
        digests = overlap.image_digests(images)
        in_training = sum(digest in known.train for digest in digests) if known else None
        known_before = bool(receipts) and store.exists(_used_location(receipts, batch))
        done = _Passed(batch, in_training, overlap.digest_array(digests), labels, known_before)
        del images, digests
        if receipt and stamp:
            _write_receipt(store, receipt, stamp, done, files_before)
        passed.append(done)
    first, repeating = _first_copies(passed)
    kept_ones = {id(p) for p in first}
    used = [p for p in passed if id(p) in kept_ones]  # in name order, as listed: the data's key depends on it
    for p in used if receipts else []:
        if not p.known_before:
            _mark_used(store, receipts, p.batch)
    return Screening([p.batch for p in used], refused + repeating, _repeats(used), ignored)


def _used_location(receipts: str, batch: IncomingBatch) -> str:
    """Where screening records that this batch, by name and content, was let through first."""
    return join(receipts, USED, f"{sha256_text(batch.name, batch.sha256)}.json")


def _mark_used(store: Store, receipts: str, batch: IncomingBatch) -> None:
    """Record that this batch (its name and content) was let through: what is "used before" when two
    batches share images is decided by name and content, never by a stamp a `chmod` or a restore changes,
    and a batch refused as a repeat never becomes it."""
    with contextlib.suppress(PreconditionFailed):
        store.create(_used_location(receipts, batch), json.dumps({"name": batch.name, "sha256": batch.sha256}).encode())


def _files_sha256(store: Store, entry: str) -> str | None:
    """A hash of every file's name and content in the batch folder `entry`, hidden ones aside as a batch's
    reader leaves them (None if one went meanwhile, or cannot be read as a file)."""
    try:
        names = [n for n in store.find(entry) if not any(part.startswith(".") for part in n.split("/"))]
        return sha256_text(*(f"{name}:{store.sha256(join(entry, name))}" for name in names))
    except (FileNotFoundError, StorageError):
        return None


def _write_receipt(store: Store, location: str, stamp: Stamp, passed: _Passed, files_before: str | None) -> None:
    """Leave the receipt of a batch that passed, if its files are still those the stamp taken before it
    was read saw; with their hash (taken before the read) if that stamp was not settled (it could stay
    the same across a write)."""
    batch = passed.batch
    files = None if stamp.settled else _files_sha256(store, batch.path)
    if not stamp.settled and (files is None or files != files_before):
        log.info("%s: changed while it was screened: no receipt; the next run screens it again", batch.path)
        return
    if store.fingerprint(batch.path) != stamp.digest:
        log.info("%s: changed while it was screened: no receipt; the next run screens it again", batch.path)
        return
    store.write_json(
        location,
        {
            "name": batch.name,
            "kind": batch.kind,
            "sha256": batch.sha256,
            "rows": batch.rows,
            "in_training": passed.in_training,
            "settled": stamp.settled,
            "files_sha256": files,
            "digests": base64.b64encode(passed.digests.tobytes()).decode(),
            "labels": base64.b64encode(np.ascontiguousarray(passed.labels, np.uint8).tobytes()).decode(),
        },
    )


def _receipt(store: Store, location: str, name: str, entry: str, stamp: Stamp) -> _Passed | None:
    """What the receipt at `location` vouches for, if it does: one written with a settled stamp while the
    batch has that stamp; one written with an unsettled stamp only while the batch's files hash the same
    (and once the stamp has settled, the receipt is written again without that condition)."""
    try:
        kept = store.read_json(location)
        batch = IncomingBatch(name, entry, kept["kind"], kept["sha256"], int(kept["rows"]), location)
        digests = np.frombuffer(base64.b64decode(kept["digests"]), np.uint8).reshape(batch.rows, overlap.DIGEST_SIZE)
        labels = np.frombuffer(base64.b64decode(kept["labels"]), np.uint8)
        settled, files, in_training = bool(kept["settled"]), kept["files_sha256"], kept["in_training"]
        if labels.shape != (batch.rows,) or kept["name"] != name or (not settled and not files):
            return None
        typed = in_training is None or type(in_training) is int
        if batch.rows < 1 or not typed or not SHA256.fullmatch(str(batch.sha256)):
            return None  # no batch holds no image: a receipt not as screening writes it is read again
    except (FileNotFoundError, IntegrityError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if not settled:
        if _files_sha256(store, entry) != files:
            return None
        if stamp.settled and store.fingerprint(entry) == stamp.digest:
            store.write_json(location, {**kept, "settled": True, "files_sha256": None})
    receipts = posixpath.dirname(location)
    return _Passed(batch, in_training, digests, labels, store.exists(_used_location(receipts, batch)))


def _first_copies(passed: list[_Passed]) -> tuple[list[_Passed], list[RefusedBatch]]:
    """The batches that hold no image an earlier one holds, and a refusal of each that does.

    Earlier: a batch an earlier run's screening passed (its receipt vouched for it) comes before one
    screened for the first time, and batches of one kind go in name order. A batch is refused if any of
    its images is in a batch used before it: two review folders of the same records, or one batch added
    twice under two names, would otherwise train each image twice (with two labels, where they differ).
    """
    order = sorted(range(len(passed)), key=lambda n: (not passed[n].known_before, passed[n].batch.name))
    ordered = [passed[n] for n in order]
    shared = overlap.shared_images([p.digests for p in ordered])
    owners: dict[int, tuple[int, int]] = {}  # an image's id -> (the used batch that holds it, its row there)
    used: list[_Passed] = []
    refused: list[RefusedBatch] = []
    for number, (candidate, (rows, ids)) in enumerate(zip(ordered, shared, strict=True)):
        images = list(zip(rows.tolist(), ids.tolist(), strict=True))  # its images that other batches hold too
        copies = [(row, owners[image]) for row, image in images if image in owners]
        if copies:
            error = _repeat_error(candidate, copies, ordered)
            refused.append(RefusedBatch(candidate.batch.name, candidate.batch.path, error))
            continue
        used.append(candidate)
        for row, image in images:
            owners.setdefault(image, (number, row))
    return used, refused


def _repeat_error(candidate: _Passed, copies: list[tuple[int, tuple[int, int]]], ordered: list[_Passed]) -> str:
    """Why `candidate` may not be used: which batches hold its images already, and where labels differ."""
    batch = candidate.batch
    holders = Counter(ordered[owner].batch.name for _, (owner, _) in copies)
    where = ", ".join(f"{count:,} in batch {name}" for name, count in holders.most_common(5))
    if len(holders) > 5:
        where += f" and {len(holders) - 5} more batches"
    row, (owner, other_row) = copies[0]
    text = (
        f"{batch.path}: {len(copies):,} of its {batch.rows:,} images are already in a batch used before it "
        f"({where}; its image {row} is image {other_row} of {ordered[owner].batch.name})"
    )
    conflicts = [
        (row, owner, other_row)
        for row, (owner, other_row) in copies
        if candidate.labels[row] != ordered[owner].labels[other_row]
    ]
    if conflicts:
        row, owner, other_row = conflicts[0]
        text += (
            f"; {len(conflicts):,} of them are labeled differently there (its image {row} is labeled "
            f"{CLASS_NAMES[candidate.labels[row]]} here and {CLASS_NAMES[ordered[owner].labels[other_row]]} in "
            f"{ordered[owner].batch.name})"
        )
    return (
        f"{text}. Training on both would count each image twice. Take the repeated images out of one of the "
        f"batches (or remove this one from the incoming folder if it holds nothing new), then `{RETRY}`; with "
        "bad_batches: quarantine, a run moves this batch aside and trains on the rest"
    )


def _repeats(used: list[_Passed]) -> list[str]:
    return [
        f"{p.batch.name}: {p.in_training:,} of its {p.batch.rows:,} images are already in the training set"
        for p in used
        if p.in_training
    ]


def collect_incoming(store: Store, incoming_dir: str) -> list[IncomingBatch]:
    """The readable batches in `incoming_dir` (see `screen_incoming`); a batch that is not raises."""
    screening = screen_incoming(store, incoming_dir, contract=False)
    screening.raise_for_refused()
    return screening.batches


class QuarantineError(RuntimeError):
    """A refused batch that could not be moved: it stays where it is, as it was."""


def quarantine(store: Store, batch: RefusedBatch, quarantine_dir: str, note: str) -> str:
    """Move a refused batch (a folder, or a stray file) out of the incoming folder whole, with why beside
    it in `QUARANTINED.txt`; return the folder it went to.

    The folder is `<quarantine>/<name>-<UTC time>/`: a folder batch's files are in it as they were, a
    stray file is in it under its own name. A name that is no batch name is replaced by one made from
    its hash. What cannot be moved stays where it is, and `QuarantineError` says why.
    """
    stem = (
        batch.name
        if BATCH_NAME.fullmatch(batch.name)
        else f"unnamed-{hashlib.sha256(batch.name.encode()).hexdigest()[:12]}"
    )
    stamp = f"{stem}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    try:
        folder = store.is_dir(batch.path)
        for attempt in range(QUARANTINE_ATTEMPTS):
            target = join(quarantine_dir, stamp if attempt == 0 else f"{stamp}-{attempt + 1}")
            try:
                store.move(batch.path, target if folder else join(target, posixpath.basename(batch.path)))
                break
            except PreconditionFailed:
                continue  # a folder of that name and second: the next name
        else:
            raise QuarantineError(f"{batch.name}: {QUARANTINE_ATTEMPTS} quarantine folders named {stamp}[-N] exist")
        taken = set(store.listdir(target))
        name = next(n for n in _note_names() if n not in taken)  # never over a file of the batch
        store.create(join(target, name), f"{batch.error}\n\n{note}\n".encode())
    except (StorageError, OSError) as exc:
        raise QuarantineError(
            f"{printable(batch.path)}: could not be quarantined ({printable(str(exc))}); left where it is"
        ) from exc
    return target


def _note_names() -> Iterator[str]:
    yield QUARANTINE_NOTE
    for number in itertools.count(2):
        yield f"QUARANTINED-{number}.txt"


def load_collected(store: Store, batch: IncomingBatch) -> tuple[np.ndarray, np.ndarray]:
    """The batch's arrays, refusing a batch whose content changed since it was collected. Its screening
    receipt (if one vouched for it) is removed then: the next run screens the batch as it is now."""
    _, images, labels = read_batch(store, batch.path)
    if content_sha256(images, labels) != batch.sha256:
        if batch.receipt:
            store.delete(batch.receipt)
        raise IncomingBatchError(
            f"{batch.path}: batch changed while the run was using it (its content is no longer what screening "
            f"checked); the next run screens it again as it is now: `{RETRY}`"
        )
    return images, labels


def known_images(store: Store, test_images: StoredFile, train_images: StoredFile) -> KnownImages:
    """The canonical images' digests, from their verified IDX files, read on first use."""
    return KnownImages(
        lambda: idx.read_images(store.local_copy(test_images)),
        lambda: idx.read_images(store.local_copy(train_images)),
        identity=f"{test_images.sha256}:{train_images.sha256}",
    )


def verified_canonical_images(store: Store, raw: str, recorded: list[str]) -> KnownImages | None:
    """The canonical images a batch must not copy, once a run has verified them into `raw`: the files a
    version recorded (`recorded`, the sha256 of the four canonical files in `DatasetSpec.files`' order: a
    deployment may pin other files than Fashion-MNIST's), else Fashion-MNIST's own. None while `raw` holds
    no test set yet."""
    spec = FASHION_MNIST
    sha256 = {f.raw_name: f.sha256 for f in spec.files}
    if len(recorded) == len(spec.files):
        sha256 = {f.raw_name: digest for f, digest in zip(spec.files, recorded, strict=True)}
    train, test = (StoredFile(join(raw, f.raw_name), sha256[f.raw_name]) for f in (spec.train_images, spec.test_images))
    if not store.exists(test.location):
        return None
    return known_images(store, test, train)


def check_batch(
    folder: Path, name: str, known: KnownImages | None = None
) -> tuple[Literal["idx", "png"], np.ndarray, np.ndarray]:
    """Read a batch as a run would, and hold it to the same checks; raise as the flow would."""
    from fmnist.data.contract import DataValidationError, failure_message, incoming_check, run_checks

    kind, images, labels = load_batch(folder)
    if known and (error := test_set_copies_error(str(folder), images, known, image_names(folder, kind))):
        raise IncomingBatchError(error)
    with tempfile.TemporaryDirectory(prefix="fmnist-batch-") as results:
        outcomes = run_checks([incoming_check(name, images, labels)], Path(results))
    if not outcomes[0].success:
        raise DataValidationError(failure_message(outcomes))
    return kind, images, labels


def add_batch(
    store: Store,
    source: Path,
    incoming_dir: str,
    name: str | None = None,
    known: KnownImages | None = None,
    finish_partial: bool = False,
) -> IncomingBatch:
    """Check the batch in the local folder `source` and copy it into `incoming_dir` as `name`.

    Nothing is copied unless the whole batch passes. Runs see the batch whole or not at all: its
    folder holds the `.incomplete` marker from before the first file until after the last.
    `finish_partial`: a partial copy of this name (its marker still there) is the caller's own,
    stopped: it is copied over, what is not the batch's is deleted, and the copy is read back and
    checked before the marker goes (a second copier at once cannot leave a mixed batch).
    """
    source = source.resolve()  # the operator's own path may go through links; what the batch holds may not
    name = name or source.name
    check_batch_name(name)
    if not source.is_dir():
        raise IncomingBatchError(f"{source}: not a folder; a batch is a folder holding an IDX pair or class folders")
    kind, images, labels = check_batch(source, name, known)
    target = join(incoming_dir, name)
    partial = finish_partial and store.exists(join(target, INCOMPLETE))
    if store.find(target) and not partial:
        raise IncomingBatchError(f"{target}: a batch of that name is already there; choose another --name")
    if not partial:
        # Unique content: a create-only write that meets the same bytes takes them for its own.
        store.create(join(target, INCOMPLETE), f"being copied by fashion-mnist add-batch {uuid.uuid4()}\n".encode())
    files = [
        f
        for f in sorted(source.rglob("*"))
        if f.is_file() and not f.is_symlink() and not any(p.startswith(".") for p in f.relative_to(source).parts)
    ]
    for file in files:
        store.put_file(file, join(target, *file.relative_to(source).parts))
    if partial:
        wanted = [f.relative_to(source).parts for f in files] + [(INCOMPLETE,)]
        held = {"/".join(parts[:depth]) for parts in wanted for depth in range(1, len(parts) + 1)}
        for stray in sorted(set(store.find(target)) - held):
            parts = stray.split("/")  # whole at the first level that is none of the batch's: no empty folder stays
            store.delete(
                join(target, *next(parts[:d] for d in range(1, len(parts) + 1) if "/".join(parts[:d]) not in held))
            )
        if content_sha256(*read_batch(store, target)[1:]) != content_sha256(images, labels):
            raise IncomingBatchError(f"{target}: changed while it was copied (a second copy at once?); run again")
    store.delete(join(target, INCOMPLETE))
    return IncomingBatch(name, target, kind, content_sha256(images, labels), len(labels))


def input_hashes(raw: RawDataset, incoming: list[IncomingBatch]) -> list[str]:
    """What the data stages' cache keys are made of: the canonical files' and each batch's content."""
    return [f.sha256 for f in raw.files] + [f"{b.name}:{b.sha256}" for b in incoming]


@dataclass(frozen=True)
class Disposal:
    """What became of a refused batch under a run's `bad_batches` policy."""

    batch: RefusedBatch
    status: str  # for the run's table of incoming batches
    moved_to: str | None = None  # where the quarantine put it
    left_because: str | None = None  # why it could not be quarantined: it stays, and is refused again next run


def dispose(store: Store, refused: RefusedBatch, policy: BadBatches, quarantine_dir: str, note: str) -> Disposal:
    """The bad-batch policy: `fail` leaves the batch where it is (the run stops); `quarantine` moves it
    out of the incoming folder with `note`, or, where it cannot be moved, leaves it and says why."""
    if policy != "quarantine":
        return Disposal(refused, "refused: the run stops")
    if refused.layout:  # maybe no batch at all (a home folder's Pictures/): only its owner moves it
        why = "not laid out as a batch, so it may be none: lay it out as one, or move it out of the incoming folder"
        return Disposal(refused, f"refused, left in place: {why}", left_because=why)
    try:
        where = quarantine(store, refused, quarantine_dir, note)
    except QuarantineError as exc:
        return Disposal(refused, f"refused, left in place: {exc}", left_because=str(exc))
    return Disposal(refused, f"quarantined: moved to {where}", moved_to=where)
