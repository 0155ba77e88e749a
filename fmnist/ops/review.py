"""Review of captured feedback: from the records the server kept (`fmnist.serving.capture`) to a folder
a person works through, and from the reviewed folder to a labeled batch (`add_batch`, with all its
checks), which starts a retrain.

    review/index.csv                        rank, id, file, predicted, confidence, version, label, at
    review/images/<class>/<rank>-<id>.png   by predicted class, lowest confidence first (rank 00001)

The person moves a wrongly classified image to its true class's folder, or deletes it. Submitting
makes `images/` a batch; every record of the index, submitted or deleted, is then written to
`<data_root>/feedback/reviewed/<batch>.json` (`fmnist.data.feedback`) and not offered again. That file
is the batch's lineage: which records, answered by which served versions (a version's manifest and model
card, and `fashion-mnist show`, report it).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import ValidationError

from fmnist.data.dataset import CLASS_SLUGS, IMAGE_SIZE, class_slug
from fmnist.data.feedback import FeedbackLedgerError, ReviewedBatch, ReviewedRecord, ledger_location, ledgers
from fmnist.data.incoming import (
    INCOMPLETE,
    IncomingBatch,
    IncomingBatchError,
    add_batch,
    check_batch_name,
    content_sha256,
    load_batch,
    read_batch,
)
from fmnist.data.overlap import KnownImages
from fmnist.serving.capture import RECORDS, SCHEMA
from fmnist.storage import PreconditionFailed, Store, join

MAX_REVIEW = 2000  # images in one review folder
MAX_RECORD_FILES = 2000  # record files read for one review (the capture folder's own bound)
INDEX = "index.csv"
IMAGES = "images"
BATCH_NAME_FILE = "batch-name.txt"  # in the review folder, beside the index, once a submit has begun
FIELDS = ("rank", "id", "file", "predicted", "confidence", "version", "label", "at")
IMAGE_NAME = re.compile(r"(\d{5})-([0-9a-f]{32})\.png")


class ReviewError(ValueError):
    """A review folder that cannot be made or submitted; the message says why."""


@dataclass(frozen=True)
class Offered:
    folder: Path
    images: int
    left: int  # unreviewed records beyond MAX_REVIEW


def reviewed_ids(store: Store, feedback: str) -> set[str]:
    try:
        return {record.id for ledger in ledgers(store, feedback) for record in ledger.records}
    except FeedbackLedgerError as exc:
        raise ReviewError(f"{exc}; until it is mended or removed, reviewed records could be offered again") from None


def unreviewed(store: Store, feedback: str) -> list[dict]:
    """The captured records not reviewed yet, lowest confidence first."""
    done = reviewed_ids(store, feedback)
    records = []
    for name in record_files(store, feedback):
        records += [r for r in read_records(store, join(feedback, RECORDS, name)) if r["id"] not in done]
    return sorted(records, key=lambda r: (r["confidence"], r["at"], r["id"]))


def read_records(store: Store, location: str) -> list[dict]:
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(location)))
    except pa.ArrowException as exc:
        raise ReviewError(f"{location}: not a parquet file ({exc}); move it out of the records folder") from None
    if not table.schema.equals(SCHEMA):
        raise ReviewError(f"{location}: not a feedback record file (its columns are {table.schema.names})")
    return table.to_pylist()


def make_review(store: Store, feedback: str, out: Path) -> Offered:
    """Write the review folder `out` of the unreviewed records (at most MAX_REVIEW)."""
    if out.exists() and any(out.iterdir()):
        raise ReviewError(f"{out} is not empty: submit it (review --submit) or delete it first")
    records = unreviewed(store, feedback)
    offered = records[:MAX_REVIEW]
    staging = out.with_name(f".{out.name}.incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    rows = []
    for rank, record in enumerate(offered, start=1):
        file = Path(IMAGES, CLASS_SLUGS[record["predicted"]], f"{rank:05d}-{record['id']}.png")
        (staging / file).parent.mkdir(parents=True, exist_ok=True)
        image = np.frombuffer(record["image"], np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
        Image.fromarray(image).save(staging / file, format="PNG")
        rows.append({**{k: record[k] for k in FIELDS if k in record}, "rank": rank, "file": str(file)})
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / INDEX, "w", newline="") as index:
        writer = csv.DictWriter(index, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {**row, "predicted": CLASS_SLUGS[row["predicted"]], "confidence": f"{row['confidence']:.4f}"}
            )
    if out.exists():
        out.rmdir()
    staging.rename(out)  # the folder appears whole
    return Offered(out, len(offered), len(records) - len(offered))


def submit_review(
    store: Store, feedback: str, folder: Path, incoming: str, name: str | None, known: KnownImages | None
) -> tuple[IncomingBatch, dict]:
    """Add the reviewed folder's images as a batch, and record every record of its index as reviewed."""
    try:
        with open(folder / INDEX, newline="") as index:
            rows = {row["id"]: row for row in csv.DictReader(index)}
    except FileNotFoundError:
        raise ReviewError(f"{folder / INDEX}: no index; is {folder} a folder `fashion-mnist review` made?") from None
    images = folder / IMAGES
    seen: dict[str, Path] = {}
    relabeled = 0
    for png in sorted(images.glob("*/*")):
        matched = IMAGE_NAME.fullmatch(png.name)
        if matched and matched.group(2) in rows:
            if matched.group(2) in seen:
                raise ReviewError(f"{png}: the same record as {seen[matched.group(2)]}; keep one of them")
            seen[matched.group(2)] = png
            relabeled += class_slug(png.parent.name) != rows[matched.group(2)]["predicted"]
    if not seen:
        raise ReviewError(f"{images}: none of the review's images is left; nothing to submit")
    records = [*({**rows[i], "labeled": seen[i].parent.name} for i in seen)]
    records += [{**rows[i], "labeled": None} for i in rows if i not in seen]
    try:
        reviewed = [ReviewedRecord.model_validate(record) for record in records]
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise ReviewError(f"{folder / INDEX}: not the index `fashion-mnist review` wrote ({problem})") from None
    # The name is kept in the folder before the batch is added: a submit that stopped before its ledger
    # was written is finished by the next one, which finds the batch it added.
    named = folder / BATCH_NAME_FILE
    name = name or (named.read_text().strip() if named.exists() else None)
    name = name or f"feedback-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    try:
        check_batch_name(name)
    except IncomingBatchError as exc:
        raise ReviewError(str(exc)) from None
    if store.exists(ledger_location(feedback, name)):
        raise ReviewError(f"{name} was reviewed already; submit with another --name")
    named.write_text(name + "\n")
    try:
        batch = added_earlier(store, images, join(incoming, name)) or add_batch(store, images, incoming, name, known)
    except IncomingBatchError as exc:
        raise ReviewError(f"the reviewed folder is not a batch: {exc}") from exc
    submitted = [r for r in reviewed if r.labeled is not None]
    ledger = ReviewedBatch(
        batch=batch.name,
        sha256=batch.sha256,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        submitted=len(submitted),
        relabeled=relabeled,
        deleted=len(reviewed) - len(submitted),
        served_versions=dict(Counter(r.version for r in submitted)),
        records=reviewed,
    )
    try:
        store.create(ledger_location(feedback, batch.name), ledger.model_dump_json(indent=1).encode())
    except PreconditionFailed:
        raise ReviewError(f"{batch.name} was reviewed already") from None
    shutil.rmtree(folder)
    return batch, ledger


def delete_reviewed_records(store: Store, feedback: str) -> int:
    """Delete the record files whose every record was reviewed: their images are in a batch now, or a
    reviewer deleted them, and the ledgers keep what they were. This makes room for capture."""
    done = reviewed_ids(store, feedback)
    deleted = 0
    for name in record_files(store, feedback):
        location = join(feedback, RECORDS, name)
        if {record["id"] for record in read_records(store, location)} <= done:
            store.delete(location)
            deleted += 1
    return deleted


def record_files(store: Store, feedback: str) -> list[str]:
    """The record files a review reads, oldest first."""
    return sorted(n for n in store.listdir(join(feedback, RECORDS)) if n.endswith(".parquet"))[:MAX_RECORD_FILES]


def added_earlier(store: Store, images: Path, target: str) -> IncomingBatch | None:
    """The batch at `target`, whole, if it holds what `images` holds: added by a submit that stopped
    before its ledger was written. (Any other batch there is add_batch's to refuse.)"""
    if not store.find(target) or store.exists(join(target, INCOMPLETE)):
        return None
    try:
        kind, stored, labels = read_batch(store, target)
    except IncomingBatchError:
        return None
    sha256 = content_sha256(stored, labels)
    if sha256 != content_sha256(*load_batch(images)[1:]):
        return None
    return IncomingBatch(posixpath.basename(target), target, kind, sha256, len(labels))
