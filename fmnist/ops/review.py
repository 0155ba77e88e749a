"""Review of captured feedback: from the records the server kept (`fmnist.serving.capture`) to a folder
a person works through, and from the reviewed folder to a labeled batch (`add_batch`, with all its
checks), which starts a retrain.

    review/index.csv                        rank, id, file, predicted, confidence, version, label, at
    review/images/<class>/<rank>-<id>.png   by predicted class, lowest confidence first (rank 00001)

The person moves a wrongly classified image to its true class's folder, or deletes it. Submitting
makes `images/` a batch; every record of the index, submitted or deleted, is then written to
`<data_root>/feedback/reviewed/<batch>.json` and not offered again. That file is the batch's
lineage: which records, answered by which served versions (`fashion-mnist show` reads it).
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from fmnist.data.dataset import CLASS_SLUGS, IMAGE_SIZE, class_slug
from fmnist.data.incoming import IncomingBatch, IncomingBatchError, add_batch
from fmnist.data.overlap import KnownImages
from fmnist.serving.capture import RECORDS, SCHEMA
from fmnist.storage import PreconditionFailed, Store, join

MAX_REVIEW = 2000  # images in one review folder
MAX_RECORD_FILES = 2000  # record files read for one review (the capture folder's own bound)
REVIEWED = "reviewed"
INDEX = "index.csv"
IMAGES = "images"
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
    ids: set[str] = set()
    for name in store.listdir(join(feedback, REVIEWED)):
        if name.endswith(".json"):
            ids.update(r["id"] for r in store.read_json(join(feedback, REVIEWED, name))["records"])
    return ids


def unreviewed(store: Store, feedback: str) -> list[dict]:
    """The captured records not reviewed yet, lowest confidence first."""
    done = reviewed_ids(store, feedback)
    names = sorted(n for n in store.listdir(join(feedback, RECORDS)) if n.endswith(".parquet"))[:MAX_RECORD_FILES]
    records = []
    for name in names:
        location = join(feedback, RECORDS, name)
        table = pq.read_table(io.BytesIO(store.read_bytes(location)))
        if not table.schema.equals(SCHEMA):
            raise ReviewError(f"{location}: not a feedback record file (its columns are {table.schema.names})")
        records += [r for r in table.to_pylist() if r["id"] not in done]
    return sorted(records, key=lambda r: (r["confidence"], r["at"], r["id"]))


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
    name = name or f"feedback-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    try:
        batch = add_batch(store, images, incoming, name, known)
    except IncomingBatchError as exc:
        raise ReviewError(f"the reviewed folder is not a batch: {exc}") from exc
    submitted = [{**rows[i], "labeled": seen[i].parent.name} for i in seen]
    lineage = {
        "batch": batch.name,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "submitted": len(submitted),
        "relabeled": relabeled,
        "deleted": len(rows) - len(submitted),
        "served_versions": dict(Counter(r["version"] for r in submitted)),
        "records": [*submitted, *({**rows[i], "labeled": None} for i in rows if i not in seen)],
    }
    try:
        store.create(join(feedback, REVIEWED, f"{batch.name}.json"), json.dumps(lineage, indent=1).encode())
    except PreconditionFailed:
        raise ReviewError(f"{batch.name} was reviewed already") from None
    shutil.rmtree(folder)
    return batch, lineage


def lineage_of(store: Store, feedback: str, sources: dict[str, int]) -> dict:
    """What a version's training sources (`train_rows_by_source`) owe to reviewed feedback."""
    batches, images, versions = [], 0, Counter()
    for source in sources:
        location = join(feedback, REVIEWED, f"{source}.json")
        if store.exists(location):
            record = store.read_json(location)
            batches.append(source)
            images += record["submitted"]
            versions.update(record["served_versions"])
    return {"reviewed_batches": batches, "reviewed_images": images, "served_versions": dict(versions)}
