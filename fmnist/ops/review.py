"""Review of captured feedback: from the records the server kept (`fmnist.data.captured`) to a folder
a person works through, and from the reviewed folder to a labeled batch (`add_batch`, with all its
checks), which starts a retrain.

    review/index.csv                        rank, id, file, predicted, confidence, version, label, at
    review/images/<class>/<rank>-<id>.png   by predicted class, lowest confidence first (rank 00001)
    review/offer.txt                        the offer (`fmnist.data.offers`) that reserves its records

The person moves a wrongly classified image to its true class's folder, or deletes it. Submitting
checks the folder against its offer (the same records, versions and images), makes `images/` a batch,
and writes every record of the offer, submitted or deleted, to `<data_root>/feedback/reviewed/<batch>.json`
(`fmnist.data.feedback`): a record enters training once, ever. That file is the batch's lineage: which
records, answered by which served versions (a version's manifest and model card, and `fashion-mnist
show`, report it).

Every step of a submit can be run again: the offer's batch name is taken first, a batch already added
(whole) is found, a partial one is copied again, a ledger already written is kept. So a stopped submit
is finished by the same command, and a copy of a submitted folder is refused, naming the batch.
"""

from __future__ import annotations

import csv
import itertools
import logging
import posixpath
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from fmnist.data.captured import Compaction, RecordFileError, candidates, compact, images_of, lowest_confidence
from fmnist.data.dataset import CLASS_SLUGS, IMAGE_SIZE
from fmnist.data.feedback import (
    MAX_REVIEW,
    FeedbackLedgerError,
    ReviewedBatch,
    ReviewedRecord,
    ledger_location,
    ledgers,
    read_ledger,
)
from fmnist.data.incoming import (
    INCOMPLETE,
    IncomingBatch,
    IncomingBatchError,
    add_batch,
    check_batch_name,
    content_sha256,
    image_names,
    load_batch,
    read_batch,
)
from fmnist.data.offers import (
    OFFER_DAYS,
    OFFER_ID,
    Offer,
    OfferedRecord,
    OfferError,
    claim,
    close_offer,
    image_sha256,
    new_offer,
    offer_location,
    open_offers,
    read_claim,
    read_offer,
    reclaim,
    write_offer,
)
from fmnist.data.overlap import KnownImages
from fmnist.storage import PreconditionFailed, Store, join

INDEX = "index.csv"
IMAGES = "images"
OFFER_FILE = "offer.txt"  # in the review folder, beside the index: the offer's id
FIELDS = ("rank", "id", "file", "predicted", "confidence", "version", "label", "at")
IMAGE_NAME = re.compile(r"(\d{5})-([0-9a-f]{32})\.png")
CHECKED = ("version", "label", "predicted")  # index fields that must be the offer's
MAX_INDEX_BYTES = 4 << 20  # an index of MAX_REVIEW rows is some 300 KB

log = logging.getLogger(__name__)


class ReviewError(ValueError):
    """A review folder that cannot be made or submitted; the message says why and what to do."""


@dataclass(frozen=True)
class Offered:
    folder: Path
    images: int
    left: int  # unreviewed, unoffered records beyond MAX_REVIEW


@dataclass(frozen=True)
class Submitted:
    batch: IncomingBatch
    ledger: ReviewedBatch
    earlier: bool  # submitted by an earlier run of the command; this one only finished it


def reviewed_by(store: Store, feedback: str) -> dict[str, ReviewedBatch]:
    """Each reviewed record's ledger, by record id."""
    try:
        return {record.id: ledger for ledger in ledgers(store, feedback) for record in ledger.records}
    except FeedbackLedgerError as exc:
        raise ReviewError(f"{exc}; until it is mended or removed, reviewed records could be offered again") from None


def reserved(store: Store, feedback: str) -> set[str]:
    """The records in a ledger or an open offer: none of them may be offered again."""
    try:
        offered = {record.id for offer in open_offers(store, feedback) for record in offer.records}
    except OfferError as exc:
        raise ReviewError(str(exc)) from None
    return set(reviewed_by(store, feedback)) | offered


def make_review(store: Store, feedback: str, out: Path) -> Offered:
    """Write the review folder `out` of the least confident records not reviewed or offered (at most
    MAX_REVIEW), and reserve them with an offer."""
    if out.exists() and not out.is_dir():
        raise ReviewError(f"{out}: not a folder; say where the review goes with --out")
    if out.exists() and any(out.iterdir()):
        raise ReviewError(f"{out} is not empty: submit it (review --submit) or delete it first")
    try:
        chosen, unoffered = lowest_confidence(store, feedback, reserved(store, feedback), MAX_REVIEW)
        images = images_of(store, feedback, chosen)
    except RecordFileError as exc:
        raise ReviewError(str(exc)) from None
    if not chosen:
        return Offered(out, 0, 0)
    staging = out.with_name(f".{out.name}.incomplete")
    for leftover in (staging, submitted_folder(out)):
        shutil.rmtree(leftover, ignore_errors=True)
    rows, offered = [], []
    for rank, record in enumerate(chosen, start=1):
        file = Path(IMAGES, CLASS_SLUGS[record.predicted], f"{rank:05d}-{record.id}.png")
        (staging / file).parent.mkdir(parents=True, exist_ok=True)
        pixels = images[record.id]
        Image.fromarray(np.frombuffer(pixels, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)).save(staging / file)
        offered.append(OfferedRecord(**asdict(record), image_sha256=image_sha256(pixels)))
        rows.append({**{k: getattr(record, k) for k in FIELDS if hasattr(record, k)}, "rank": rank, "file": file})
    with open(staging / INDEX, "w", newline="") as index:
        writer = csv.DictWriter(index, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {**row, "predicted": CLASS_SLUGS[row["predicted"]], "confidence": f"{row['confidence']:.4f}"}
            )
    offer = new_offer(offered)
    (staging / OFFER_FILE).write_text(offer.offer + "\n")
    if out.exists():
        out.rmdir()
    staging.rename(out)  # the folder appears whole
    # Reserved once the folder is there: a review stopped before leaves no offer without a folder
    # (whose records would wait its days); one stopped after, a folder that submit refuses.
    write_offer(store, feedback, offer)
    return Offered(out, len(chosen), unoffered - len(chosen))


def submit_review(
    store: Store, feedback: str, folder: Path, incoming: str, name: str | None, known: KnownImages | None
) -> Submitted:
    """Add the reviewed folder's images as a batch, and record every record of its offer as reviewed."""
    if not folder.is_dir():
        what = (
            "not a folder"
            if folder.exists()
            else "no such folder; nothing to submit (a submit that finished removes it)"
        )
        raise ReviewError(f"{folder}: {what}")
    rows = read_index(folder)
    offer_id = read_offer_id(folder)
    images = folder / IMAGES
    try:
        kind, pixels, labels = load_batch(images)
    except IncomingBatchError as exc:
        raise ReviewError(f"the reviewed folder is not a batch: {exc}") from exc
    content = content_sha256(pixels, labels)
    done = reviewed_by(store, feedback)
    try:
        offer = read_offer(store, feedback, offer_id)
    except OfferError as exc:
        offer = rebuilt_offer(store, feedback, offer_id, rows, str(exc))
    if offer is None:
        return finished_earlier(store, folder, incoming, offer_id, content, done)
    kept = check_against_offer(folder, rows, image_names(images, kind) or [], pixels, offer)
    ids = [i for i in rows if i in done and done[i].offer != offer_id]  # another review's batch holds them
    if ids:
        again = sorted({done[i].batch for i in ids})
        raise ReviewError(
            f"{len(ids)} of this review's records are reviewed already, in batch {', '.join(again)} "
            f"({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''}): a record enters training once; nothing added"
        )
    name = batch_name(store, feedback, incoming, offer_id, name, content)
    target = join(incoming, name)
    batch = added_earlier(store, target, content)
    if batch is None:
        try:  # a partial copy there is this offer's own (the claim names its content), stopped midway
            batch = add_batch(store, images, incoming, name, known, finish_partial=True)
        except IncomingBatchError as exc:
            raise ReviewError(f"the reviewed folder is not a batch: {exc}") from exc
    relabeled = sum(CLASS_SLUGS[labels[row]] != rows[i]["predicted"] for i, row in kept.items())
    sources = {record.id: record.source for record in offer.records}
    records = [
        ReviewedRecord(
            **{k: rows[i][k] for k in FIELDS},
            source=sources[i],
            labeled=CLASS_SLUGS[labels[kept[i]]] if i in kept else None,
        )
        for i in rows
    ]
    submitted = [r for r in records if r.labeled is not None]
    ledger = ReviewedBatch(
        batch=batch.name,
        sha256=batch.sha256,
        offer=offer_id,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        submitted=len(submitted),
        relabeled=relabeled,
        deleted=len(records) - len(submitted),
        served_versions=dict(Counter(r.version for r in submitted)),
        records=records,
    )
    try:
        store.create(ledger_location(feedback, batch.name), ledger.model_dump_json(indent=1).encode())
    except PreconditionFailed:
        ledger = read_ledger(store, ledger_location(feedback, batch.name))
        if ledger.offer != offer_id:
            raise ReviewError(f"{batch.name} was reviewed already, by another review") from None
    close_offer(store, feedback, offer_id)
    remove_folder(folder)
    return Submitted(batch, ledger, earlier=False)


def remove_folder(folder: Path) -> None:
    """Remove a submitted review folder: renamed away first, so that a stop midway leaves no half
    folder that a rerun would take for another review (`make_review` sweeps the renamed one)."""
    gone = submitted_folder(folder)
    shutil.rmtree(gone, ignore_errors=True)
    folder.rename(gone)
    shutil.rmtree(gone)


def submitted_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.submitted")


def read_index(folder: Path) -> dict[str, dict]:
    """The index's rows by record id: the columns `make_review` wrote, at most MAX_REVIEW rows."""
    index = folder / INDEX
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ReviewError(f"{index}: over {MAX_INDEX_BYTES:,} bytes; not the index `fashion-mnist review` wrote")
        with open(index, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            rows = list(itertools.islice(reader, MAX_REVIEW + 1))
            header = reader.fieldnames
    except FileNotFoundError:
        raise ReviewError(f"{index}: no index; is {folder} a folder `fashion-mnist review` made?") from None
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ReviewError(f"{index}: not the index `fashion-mnist review` wrote ({exc})") from None
    by_id = {row.get("id"): row for row in rows}
    if tuple(header or ()) != FIELDS or any(None in row or None in row.values() for row in rows):
        raise ReviewError(f"{index}: not the index `fashion-mnist review` wrote (its columns are {FIELDS})")
    if len(rows) > MAX_REVIEW or len(by_id) != len(rows):
        raise ReviewError(
            f"{index}: not the index `fashion-mnist review` wrote (over {MAX_REVIEW} rows, or a record twice)"
        )
    return by_id


def read_offer_id(folder: Path) -> str:
    try:
        with open(folder / OFFER_FILE, "rb") as file:
            offer = file.read(64).decode().strip()
    except (OSError, UnicodeDecodeError):
        offer = ""
    if not re.fullmatch(OFFER_ID, offer):
        raise ReviewError(
            f"{folder / OFFER_FILE}: missing or damaged, so {folder} is no review this data root offered; "
            "make one with `fashion-mnist review`"
        )
    return offer


def kept_images(folder: Path, rows: dict[str, dict], names: list[str]) -> dict[str, int]:
    """The batch row of each record the reviewer kept. Every image must be one the review offered, once."""
    kept: dict[str, int] = {}
    for row, name in enumerate(names):
        matched = IMAGE_NAME.fullmatch(Path(name).name)
        png = folder / IMAGES / name
        if not matched or matched.group(2) not in rows:
            raise ReviewError(f"{png}: not an image this review offered; only the offered images may be submitted")
        if matched.group(2) in kept:
            raise ReviewError(f"{png}: the same record as {folder / IMAGES / names[kept[matched.group(2)]]}; keep one")
        kept[matched.group(2)] = row
    if not kept:
        raise ReviewError(f"{folder / IMAGES}: none of the review's images is left; nothing to submit")
    return kept


def check_against_offer(
    folder: Path, rows: dict[str, dict], names: list[str], pixels: np.ndarray, offer: Offer
) -> dict[str, int]:
    """The index names the offer's records as offered, and each image (`names`: the batch's files) is
    an offered record's own, once. The batch row of each record kept."""
    offered = {record.id: record for record in offer.records}
    if set(rows) != set(offered):
        strange = sorted(set(rows) ^ set(offered))
        raise ReviewError(
            f"{folder / INDEX}: not the records offer {offer.offer} holds ({len(strange)} differ, e.g. {strange[0]}); "
            "restore the index `fashion-mnist review` wrote"
        )
    for record_id, row in rows.items():
        record = offered[record_id]
        expected = {"version": record.version, "label": record.label, "predicted": CLASS_SLUGS[record.predicted]}
        for field in CHECKED:
            if row.get(field) != expected[field]:
                raise ReviewError(
                    f"{folder / INDEX}: record {record_id} has {field} {row.get(field)!r}, but it was offered with "
                    f"{expected[field]!r}; restore the index `fashion-mnist review` wrote"
                )
    kept = kept_images(folder, rows, names)
    for record_id, row in kept.items():
        if image_sha256(np.ascontiguousarray(pixels[row]).tobytes()) != offered[record_id].image_sha256:
            raise ReviewError(f"{folder / IMAGES}: the image of record {record_id} is not the one it was offered with")
    return kept


def batch_name(store: Store, feedback: str, incoming: str, offer: str, name: str | None, content: str) -> str:
    """The name the offer is submitted as: taken by its first submit, with the content it submits,
    and kept by every later one. Another content under that name is a copy labeled otherwise (or the
    folder changed after its submit began): refused, unless nothing of it was copied yet."""
    wanted = name or f"feedback-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    try:
        check_batch_name(wanted)
        begun = read_claim(store, feedback, offer)
        if not begun and (store.exists(ledger_location(feedback, wanted)) or store.find(join(incoming, wanted))):
            raise ReviewError(f"{join(incoming, wanted)}: a batch of that name exists; choose another --name")
        taken = claim(store, feedback, offer, wanted, content)
        if name and taken.batch != name:
            raise ReviewError(
                f"this review is being submitted as {taken.batch} (its first submit took that name): "
                f"run `fashion-mnist review --submit` without --name, or with --name {taken.batch}"
            )
        if taken.sha256 != content:
            if store.find(join(incoming, taken.batch)):
                raise ReviewError(
                    f"this review is being submitted as batch {taken.batch} with other images or labels (a copy of the "
                    "folder, or the folder changed after its submit began); nothing added: submit the folder it began "
                    "with, or put its images back as they were"
                )
            taken = reclaim(store, feedback, offer, content)
    except (IncomingBatchError, OfferError) as exc:
        raise ReviewError(str(exc)) from None
    return taken.batch


def rebuilt_offer(store: Store, feedback: str, offer_id: str, rows: dict[str, dict], damage: str) -> Offer:
    """A damaged offer, rebuilt from the record files for the index's ids (the offered records are in
    them until their ledger is written), and written again; refused if any record is gone."""
    try:
        found = [c for c in candidates(store, feedback, set()) if c.id in rows]
        images = images_of(store, feedback, found)
    except RecordFileError as exc:
        raise ReviewError(f"{damage}; and it cannot be rebuilt: {exc}") from None
    records = {c.id: OfferedRecord(**asdict(c), image_sha256=image_sha256(images[c.id])) for c in found}
    if set(records) != set(rows):
        raise ReviewError(
            f"{damage}; and {len(set(rows) - set(records))} of its records are no longer in the record files, so it "
            "cannot be rebuilt: make a new review with `fashion-mnist review`"
        )
    claimed = read_claim(store, feedback, offer_id)
    made = datetime.now(UTC).replace(microsecond=0)
    offer = Offer(offer=offer_id, at=made, records=[records[i] for i in rows])
    store.write_bytes(offer_location(feedback, offer_id), offer.model_dump_json().encode())
    log.warning(
        "%s; rebuilt from the record files%s", damage, f" (its submit began as {claimed.batch})" if claimed else ""
    )
    return offer


def added_earlier(store: Store, target: str, content: str) -> IncomingBatch | None:
    """The batch at `target`, whole, if it holds `content`: added by a submit that stopped before its
    ledger was written. A whole batch there with other content is a copy of the folder, labeled otherwise."""
    if not store.find(target) or store.exists(join(target, INCOMPLETE)):
        return None
    try:
        kind, stored, labels = read_batch(store, target)
    except IncomingBatchError as exc:
        raise ReviewError(f"{target}: the batch this review is submitted as is there, unreadable ({exc})") from None
    sha256 = content_sha256(stored, labels)
    if sha256 != content:
        raise ReviewError(
            f"{target}: this review was submitted as that batch already, with other images or labels "
            "(a copy of the folder?); nothing added"
        )
    return IncomingBatch(posixpath.basename(target), target, kind, sha256, len(labels))


def finished_earlier(
    store: Store, folder: Path, incoming: str, offer: str, content: str, done: dict[str, ReviewedBatch]
) -> Submitted:
    """A folder whose offer is closed: finish the submit that closed it (its folder's removal), or
    refuse a copy that differs."""
    ledger = next((ledger for ledger in done.values() if ledger.offer == offer), None)
    if ledger is None:
        raise ReviewError(
            f"offer {offer} of {folder} is not in the store: it was released after {OFFER_DAYS} days, or the "
            "folder was made for another data root; make a new one with `fashion-mnist review`"
        )
    if ledger.sha256 != content:
        raise ReviewError(
            f"{folder}: its records were submitted as batch {ledger.batch} already, with other images or labels "
            "(a copy of the folder?); nothing added: delete the folder"
        )
    remove_folder(folder)
    batch = IncomingBatch(ledger.batch, join(incoming, ledger.batch), "png", content, ledger.submitted)
    return Submitted(batch, ledger, earlier=True)


def compact_records(store: Store, feedback: str) -> Compaction:
    """Free the space of every reviewed record still in the record files (`captured.compact`)."""
    try:
        return compact(store, feedback, set(reviewed_by(store, feedback)))
    except RecordFileError as exc:
        raise ReviewError(str(exc)) from None
