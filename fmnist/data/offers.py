"""Review offers: the records a review folder holds, reserved in the store until they are submitted.

    <data_root>/feedback/offers/<offer>.json     the offered records: id, version, label, predicted,
                                                 confidence, time, record file, the image's sha256
    <data_root>/feedback/offers/<offer>.submit   the batch name and content, created by the first
                                                 submit of the offer

A record is in at most one offer, and an offered record is not offered again (`fmnist.ops.review`), so
two review folders never hold the same record. The offer is what a submit is checked against: the
folder's index must name the offer's records with their versions, and each image must be the record's
own. The `.submit` file is taken before the batch is added, so every copy of a folder, and every rerun
of a stopped submit, submits under the one name: a rerun finishes it, a copy is refused. Once the
ledger (`fmnist.data.feedback`) holds the records, the offer is deleted.

An offer nobody submits keeps its records for OFFER_DAYS; the next review then releases them (an offer
whose submit has begun is never released). A copy of a folder labeled otherwise is refused: the
`.submit` file holds the content the first submit added.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from fmnist.storage import IntegrityError, PreconditionFailed, Store, join

OFFERS = "offers"
OFFER_DAYS = 14
OFFER_ID = r"^[0-9a-f]{32}$"

log = logging.getLogger(__name__)


class OfferError(ValueError):
    """An offer that is missing, damaged or taken; the message names it and the way out."""


class OfferedRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    version: str
    label: str
    predicted: int = Field(ge=0, le=9)
    confidence: float
    at: str
    source: str = Field(description="the record file it was read from")
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Offer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offer: str = Field(pattern=OFFER_ID)
    at: AwareDatetime
    records: list[OfferedRecord]


def image_sha256(pixels: bytes) -> str:
    return hashlib.sha256(pixels).hexdigest()


def offers_folder(feedback: str) -> str:
    return join(feedback, OFFERS)


def offer_location(feedback: str, offer: str) -> str:
    return join(offers_folder(feedback), f"{offer}.json")


def submit_location(feedback: str, offer: str) -> str:
    return join(offers_folder(feedback), f"{offer}.submit")


def new_offer(records: list[OfferedRecord]) -> Offer:
    return Offer(offer=uuid.uuid4().hex, at=datetime.now(UTC).replace(microsecond=0), records=records)


def write_offer(store: Store, feedback: str, offer: Offer) -> None:
    store.create(offer_location(feedback, offer.offer), offer.model_dump_json().encode())


def read_offer(store: Store, feedback: str, offer: str) -> Offer | None:
    """The offer, or None where there is none (submitted and done, released, or another data root's)."""
    way_out = "; delete it and run `fashion-mnist review` again"
    return _read(store, offer_location(feedback, offer), Offer, "a review offer", way_out)


def open_offers(store: Store, feedback: str) -> list[Offer]:
    """Every offer not yet done. Released (deleted) on the way: offers older than OFFER_DAYS, and
    damaged ones, whose submit never began (nothing of theirs was added). A damaged offer whose submit
    began is an error naming the way out: its batch may be in, and its records must not be offered."""
    now, kept = datetime.now(UTC), []
    for name in sorted(store.listdir(offers_folder(feedback))):
        offer_id = name.removesuffix(".json")
        if not name.endswith(".json") or not re.fullmatch(OFFER_ID, offer_id):
            continue
        begun = read_claim(store, feedback, offer_id)
        try:
            offer = read_offer(store, feedback, offer_id)
        except OfferError as exc:
            if begun:
                raise OfferError(
                    f"{exc}; its submit began, as batch {begun.batch}: run `fashion-mnist review --submit` on its "
                    "folder, which rebuilds the offer from the record files and finishes it"
                ) from None
            log.warning("%s; released (its submit never began, so nothing of it was added)", exc)
            store.delete(offer_location(feedback, offer_id))
            continue
        if offer is None:  # done meanwhile
            continue
        if now - offer.at > timedelta(days=OFFER_DAYS) and not begun:
            store.delete(offer_location(feedback, offer.offer))
            continue
        kept.append(offer)
    return kept


class Claim(BaseModel):
    """What the first submit of an offer took: the batch name, and the content it submits."""

    batch: str
    sha256: str


def read_claim(store: Store, feedback: str, offer: str) -> Claim | None:
    return _read(store, submit_location(feedback, offer), Claim, "an offer's submit record")


def _read(store: Store, location: str, model: type[BaseModel], what: str, way_out: str = ""):
    """`location` read as `model`, or None where there is none; what is there but is no `what` is an OfferError."""
    if not store.exists(location):
        return None
    try:
        return model.model_validate(store.read_json(location))
    except (IntegrityError, ValidationError) as exc:
        raise OfferError(f"{location}: not {what} ({exc}){way_out}") from None


def claim(store: Store, feedback: str, offer: str, name: str, sha256: str) -> Claim:
    """The batch name and content the offer is submitted as: `name` and `sha256`, if this is its first
    submit; else what the first submit took (a stopped submit, or a copy of its folder)."""
    try:
        store.create(submit_location(feedback, offer), Claim(batch=name, sha256=sha256).model_dump_json().encode())
        return Claim(batch=name, sha256=sha256)
    except PreconditionFailed:
        return read_claim(store, feedback, offer)


def reclaim(store: Store, feedback: str, offer: str, sha256: str) -> Claim:
    """The claim with the content changed: for a folder edited after a submit that stopped before
    anything was copied. Conditional on the claim as read, so two submits cannot both change it."""
    location = submit_location(feedback, offer)
    data, etag = store.read_versioned(location)
    changed = Claim.model_validate_json(data).model_copy(update={"sha256": sha256})
    store.replace(location, changed.model_dump_json().encode(), etag)
    return changed


def close_offer(store: Store, feedback: str, offer: str) -> None:
    """The ledger holds the offer's records now: the reservation goes. (A stop between the two
    leaves an open offer whose ledger exists: the next submit of its folder closes it.)"""
    store.delete(submit_location(feedback, offer))
    store.delete(offer_location(feedback, offer))
