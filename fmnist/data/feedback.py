"""The ledger of reviewed feedback: one file for each batch `fashion-mnist review --submit` added,
`<data_root>/feedback/reviewed/<batch>.json`, naming every record the review offered (submitted or
deleted) and the served versions that answered them.

Review reads it so that no record is offered twice; registration reads it for a version's lineage (the
reviewed batches it learned from, matched by name and content hash). A ledger is untrusted input like
any file: one that does not parse is named in the error (review) or in the lineage (registration).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fmnist.storage import IntegrityError, NotAFile, Store, join
from fmnist.storage.files import printable

REVIEWED = "reviewed"


class FeedbackLedgerError(ValueError):
    """A ledger file that is not one; the message names it."""


class ReviewedRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    version: str
    labeled: str | None = Field(description="the class it was submitted as; None: deleted by the reviewer")


class ReviewedBatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    batch: str
    sha256: str | None = Field(None, description="the batch's content hash; the first ledgers lack it")
    offer: str | None = Field(
        None, description="the review offer it closed (`fmnist.data.offers`); older ledgers lack it"
    )
    at: str
    submitted: int = Field(ge=0)
    relabeled: int = Field(ge=0)
    deleted: int = Field(ge=0)
    served_versions: dict[str, int] = Field(description="submitted images by the version that answered them")
    records: list[ReviewedRecord]


@dataclass(frozen=True)
class FeedbackLineage:
    """What a training set owes to reviewed feedback."""

    reviewed_batches: list[str] = field(default_factory=list)
    reviewed_images: int = 0
    served_versions: dict[str, int] = field(default_factory=dict)
    unreadable_ledgers: list[str] = field(default_factory=list)


def ledger_location(feedback: str, batch: str) -> str:
    return join(feedback, REVIEWED, f"{batch}.json")


MAX_REVIEW = 2000  # images in one review folder, and so records in one ledger
# Each record is some 400 bytes of indented JSON with its file name and source path (a full ledger measured
# 0.7-1.3 MB); five times that is room enough. A bigger file is no ledger, and is never read whole.
LEDGER_RECORD_BYTES = 2 << 10
MAX_LEDGER_BYTES = MAX_REVIEW * LEDGER_RECORD_BYTES


def read_ledger(store: Store, location: str) -> ReviewedBatch:
    """The ledger at `location`; FeedbackLedgerError naming it if it is damaged, too big, or no file at all
    (a FIFO, a device, a folder: each reader names it instead of stopping at it)."""
    try:
        data = store.read_at_most(location, MAX_LEDGER_BYTES)
    except NotAFile as exc:
        raise FeedbackLedgerError(str(exc)) from None
    except FileNotFoundError as exc:  # gone (left to the caller), or a folder where the ledger is
        if store.is_dir(location):
            raise FeedbackLedgerError(str(exc)) from None
        raise
    if data is None:
        raise FeedbackLedgerError(f"{location}: over {MAX_LEDGER_BYTES:,} bytes, more than a review holds")
    try:
        return ReviewedBatch.model_validate(store.parse_json(data, location))
    except IntegrityError as exc:
        raise FeedbackLedgerError(str(exc)) from None
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise FeedbackLedgerError(f"{location}: not a review ledger ({where}: {problem['msg']})") from None


def ledgers(store: Store, feedback: str) -> list[ReviewedBatch]:
    """Every batch's ledger; a damaged one is an error naming it."""
    names = sorted(n for n in store.listdir(join(feedback, REVIEWED)) if n.endswith(".json"))
    return [read_ledger(store, join(feedback, REVIEWED, name)) for name in names]


def feedback_lineage(store: Store, feedback: str, batches: dict[str, str]) -> FeedbackLineage:
    """The reviewed batches among `batches` (a training set's incoming sources, {name: content sha256}):
    how many reviewed images they hold, and which served versions answered them. A ledger of a batch's
    name whose hash differs belongs to another batch of that name, and does not count."""
    reviewed, images, versions, unreadable = [], 0, Counter(), []
    for name, sha256 in sorted(batches.items()):
        try:  # read without asking first whether it exists: a dangling link or a link loop "does not exist"
            ledger = read_ledger(store, ledger_location(feedback, name))
        except FeedbackLedgerError:
            unreadable.append(name)
            continue
        except FileNotFoundError:  # no review of this batch (or its ledger gone since)
            continue
        if ledger.batch == name and ledger.sha256 in (None, sha256):
            reviewed.append(name)
            images += ledger.submitted
            versions.update(ledger.served_versions)
    return FeedbackLineage(reviewed, images, dict(versions), unreadable)


MAX_REVIEWED_LEDGERS = 1000  # the newest ledgers `reviewed_answers` reads (a review is up to a few thousand images)


@dataclass(frozen=True)
class ReviewedAnswer:
    """A served answer a reviewer labeled: the version that gave it, when, and whether it was right."""

    version: str
    at: float  # seconds since the epoch, when it was served
    correct: bool


@dataclass(frozen=True)
class ReviewedAnswers:
    answers: list[ReviewedAnswer]
    unreadable: list[str]  # ledgers (and record fields) that could not be read, named
    left_out: int = 0  # readable ledgers older than the newest MAX_REVIEWED_LEDGERS: their answers are not here


def reviewed_answers(store: Store, feedback: str, versions: set[str]) -> ReviewedAnswers:
    """Every reviewed answer of `versions` in the newest MAX_REVIEWED_LEDGERS ledgers (by the time each says it
    was reviewed: a name says nothing), and how many older ones were `left_out`: the truth the label-free
    estimates are held to, and how much of it is missing. A record the reviewer deleted has no truth; a ledger
    from before records kept what was predicted and when (or one that does not parse, or is over
    MAX_LEDGER_BYTES) is named in `unreadable`, never guessed. So is a ledger that is not the batch its name
    says (a copy under another name), and anything that is no file (a FIFO, a device); a record counts once,
    however many times it is in one ledger or in several."""
    read, unreadable = [], []
    for name in sorted(n for n in store.listdir(join(feedback, REVIEWED)) if n.endswith(".json")):
        found, problem = _ledger_answers(store, join(feedback, REVIEWED, name), name, versions)
        if problem:
            unreadable.append(printable(problem))  # names it; a name that is not UTF-8 goes on into logs
        else:
            read.append(found)
    read.sort(key=lambda ledger: ledger[0], reverse=True)
    answers, counted = [], set()
    for _, records in read[:MAX_REVIEWED_LEDGERS]:
        for record_id, answer in records:
            if record_id not in counted:
                counted.add(record_id)
                answers.append(answer)
    return ReviewedAnswers(answers, unreadable, max(len(read) - MAX_REVIEWED_LEDGERS, 0))


def _ledger_answers(
    store: Store, location: str, name: str, versions: set[str]
) -> tuple[tuple[float, list[tuple[str, ReviewedAnswer]]], str]:
    """The ledger at `location`: when it was reviewed and its labeled answers of `versions` (by record id);
    or the problem that makes it no ledger to count."""
    try:
        ledger = read_ledger(store, location)
    except (FeedbackLedgerError, FileNotFoundError) as exc:
        return (0.0, []), str(exc)
    if f"{ledger.batch}.json" != name:
        return (0.0, []), f"{location}: the ledger of batch {ledger.batch[:64]!r}, not of its name"
    reviewed = _timestamp(ledger.at)
    if not math.isfinite(reviewed):
        return (0.0, []), f"{location}: at {ledger.at[:64]!r} is not a time"
    records = [r for r in ledger.records if r.labeled and r.version in versions]
    found = [_reviewed(record) for record in records]
    if None in found:  # a ledger from before records kept what was answered and when: none of it is guessed
        return (0.0, []), f"{location}: its records do not say what was answered, and when"
    return (reviewed, [(record.id, answer) for record, answer in zip(records, found, strict=True)]), ""


def _timestamp(at: object) -> float:
    """An ISO time as seconds since the epoch; NaN if it is none."""
    try:
        return datetime.fromisoformat(at).timestamp() if isinstance(at, str) else math.nan
    except ValueError:
        return math.nan


def _reviewed(record: ReviewedRecord) -> ReviewedAnswer | None:
    predicted = getattr(record, "predicted", None)
    served = _timestamp(getattr(record, "at", None))
    if not isinstance(predicted, str) or not math.isfinite(served):
        return None
    return ReviewedAnswer(record.version, served, predicted == record.labeled)
