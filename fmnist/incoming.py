"""New labeled data: batches dropped in the incoming folder join the training set.

Each batch is a folder of its own under the incoming folder (a local folder or an s3:// prefix), in
one of two forms:
- an IDX pair: one `*images-idx3-ubyte[.gz]` and one `*labels-idx1-ubyte[.gz]` file;
- PNG images (28x28, 8-bit grayscale) in one sub-folder per class, named by the class
  (`t-shirt-top`, `trouser`, ..., `ankle-boot`; case, spaces and `_` are forgiven) or its index.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fmnist import idx
from fmnist.dataset import CLASS_SLUGS, NUM_CLASSES, class_slug
from fmnist.png import ImageFileError, read_grayscale_png
from fmnist.storage import Store, join

log = logging.getLogger(__name__)
# Present while `add_batch` copies a batch in: runs leave such a folder alone.
INCOMPLETE = ".incomplete"
BATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class IncomingBatchError(ValueError):
    """A batch folder that cannot be read; the message names the folder or file."""


@dataclass(frozen=True)
class IncomingBatch:
    name: str
    path: str  # its location: a local folder or an s3:// prefix
    kind: Literal["idx", "png"]
    sha256: str  # of the decoded images and labels: same content, same hash, whatever the encoding
    rows: int


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern)) + sorted(folder.glob(pattern + ".gz"))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise IncomingBatchError(f"{folder}: more than one file matches {pattern}[.gz]: {names}")
    return found[0] if found else None


def _class_index(folder: Path) -> int:
    name = folder.name
    if name.isdigit() and int(name) < NUM_CLASSES:
        return int(name)
    try:
        return CLASS_SLUGS.index(class_slug(name))
    except ValueError:
        raise IncomingBatchError(
            f"{folder}: not a class name; use one of {', '.join(CLASS_SLUGS)} or 0-{NUM_CLASSES - 1}"
        ) from None


def _read_png_batch(folder: Path, class_dirs: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        label = _class_index(class_dir)
        for png in sorted(class_dir.glob("*.png")):
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
        raise IncomingBatchError(f"{folder}: class folders hold no .png files")
    return np.stack(images), np.asarray(labels, dtype=np.uint8)


def load_batch(folder: Path) -> tuple[Literal["idx", "png"], np.ndarray, np.ndarray]:
    """The batch's kind, its (n, rows, columns) uint8 images and (n,) labels."""
    images_file = _one(folder, "*images-idx3-ubyte")
    labels_file = _one(folder, "*labels-idx1-ubyte")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if images_file and labels_file and not class_dirs:
        images, labels = idx.read_pair(images_file, labels_file)
        return "idx", images, labels
    if class_dirs and not (images_file or labels_file):
        return "png", *_read_png_batch(folder, class_dirs)
    raise IncomingBatchError(
        f"{folder}: a batch holds either one *images-idx3-ubyte[.gz] file with one "
        "*labels-idx1-ubyte[.gz] file, or PNG images in one folder per class"
    )


def read_batch(store: Store, location: str) -> tuple[Literal["idx", "png"], np.ndarray, np.ndarray]:
    """`load_batch` of a batch wherever it is stored; errors name the stored location."""
    with store.local_tree(location) as folder:
        try:
            return load_batch(folder)
        except (IncomingBatchError, idx.IdxFormatError) as exc:
            if folder == Path(location):
                raise
            raise IncomingBatchError(str(exc).replace(str(folder), location)) from exc


def collect_incoming(store: Store, incoming_dir: str) -> list[IncomingBatch]:
    """Every batch in `incoming_dir` (which may not exist: then there are none), by folder name.

    A batch that `add_batch` is still copying (its `.incomplete` marker is there) is not a batch yet.
    """
    batches = []
    for name in store.listdir(incoming_dir):
        if name.startswith("."):
            continue
        entry = join(incoming_dir, name)
        if store.exists(join(entry, INCOMPLETE)):
            log.warning("%s: still being added (or the copy was interrupted): left out of this run", entry)
            continue
        if not store.is_dir(entry):
            raise IncomingBatchError(f"{entry}: put each batch in a folder of its own: {incoming_dir}/<batch-name>/")
        kind, images, labels = read_batch(store, entry)
        batches.append(IncomingBatch(name, entry, kind, content_sha256(images, labels), len(labels)))
    return batches


def load_collected(store: Store, batch: IncomingBatch) -> tuple[np.ndarray, np.ndarray]:
    """The batch's arrays, refusing a batch whose content changed since it was collected."""
    _, images, labels = read_batch(store, batch.path)
    if content_sha256(images, labels) != batch.sha256:
        raise IncomingBatchError(f"{batch.path}: batch changed while the run was using it; run again")
    return images, labels


def check_batch(folder: Path, name: str) -> tuple[Literal["idx", "png"], np.ndarray, np.ndarray]:
    """Read a batch as a run would, and hold it to the same contract suite; raise as the flow would."""
    from fmnist.contract import DataValidationError, failure_message, incoming_check, run_checks

    kind, images, labels = load_batch(folder)
    with tempfile.TemporaryDirectory(prefix="fmnist-batch-") as results:
        outcomes = run_checks([incoming_check(name, images, labels)], Path(results))
    if not outcomes[0].success:
        raise DataValidationError(failure_message(outcomes))
    return kind, images, labels


def add_batch(store: Store, source: Path, incoming_dir: str, name: str | None = None) -> IncomingBatch:
    """Check the batch in the local folder `source` and copy it into `incoming_dir` as `name`.

    Nothing is copied unless the whole batch passes. Runs see the batch whole or not at all: its
    folder holds the `.incomplete` marker from before the first file until after the last.
    """
    name = name or source.resolve().name
    if not BATCH_NAME.match(name):
        raise IncomingBatchError(
            f"{name!r}: a batch name is up to 100 letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    if not source.is_dir():
        raise IncomingBatchError(f"{source}: not a folder; a batch is a folder holding an IDX pair or class folders")
    kind, images, labels = check_batch(source, name)
    target = join(incoming_dir, name)
    if store.find(target):
        raise IncomingBatchError(f"{target}: a batch of that name is already there; choose another --name")
    store.create(join(target, INCOMPLETE), b"being copied by fashion-mnist add-batch\n")
    files = [
        f
        for f in sorted(source.rglob("*"))
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(source).parts)
    ]
    for file in files:
        store.put_file(file, join(target, *file.relative_to(source).parts))
    store.delete(join(target, INCOMPLETE))
    return IncomingBatch(name, target, kind, content_sha256(images, labels), len(labels))
