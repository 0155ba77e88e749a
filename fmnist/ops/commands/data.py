"""The commands that add data for the deployments to train on: add-batch, and review (of what serve captured)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from fmnist.data.incoming import IncomingBatch, add_batch, verified_canonical_images
from fmnist.data.overlap import KnownImages
from fmnist.ops import events
from fmnist.ops.commands.roots import deployed_storage
from fmnist.ops.review import IMAGES, ReviewError, compact_records, make_review, submit_review
from fmnist.registry.versions import Registry
from fmnist.storage import StorageError, Store
from fmnist.storage.layout import StorageParams


def cmd_add_batch(args: argparse.Namespace) -> None:
    storage, source = deployed_storage(args, Path.cwd())
    print(f"Adding to {storage.incoming} (registry {storage.registry}; from {source})")
    store = storage.store()
    known = known_test_and_train(store, storage)
    batch = add_batch(store, args.folder, storage.incoming, args.name, known)
    print(f"Added batch {batch.name}: {batch.rows} {batch.kind} images, at {batch.path}")
    announce(batch, storage)


def cmd_review(args: argparse.Namespace) -> None:
    storage, _ = deployed_storage(args, Path.cwd())
    store, feedback = storage.store(), storage.data.feedback
    if not args.submit:
        offered = make_review(store, feedback, args.out)
        if not offered.images:
            print(f"No captured images of {feedback} wait for review")
            return
        more = f"; {offered.left} more wait for the next review" if offered.left else ""
        print(f"{offered.images} captured images from {feedback} are in {offered.folder}{more}")
        print(
            f"Move each wrong one to its class's folder under {args.out / IMAGES} (or delete it), then: review --submit"
        )
        return
    known = known_test_and_train(store, storage)
    done = submit_review(store, feedback, args.out, storage.incoming, args.name, known)
    batch, ledger = done.batch, done.ledger
    print(
        f"{'Batch ' + batch.name + ' was added by an earlier submit' if done.earlier else 'Added batch ' + batch.name}"
        f" to {storage.incoming}: {ledger.submitted} reviewed images "
        f"({ledger.relabeled} relabeled, {ledger.deleted} deleted), served by "
        + ", ".join(f"{v} ({n})" for v, n in sorted(ledger.served_versions.items()))
    )
    announce(batch, storage)  # again for a finished earlier submit: it may have stopped before announcing
    try:
        freed = compact_records(store, feedback)
    except (ReviewError, StorageError) as exc:  # the batch is in; only the clean-up failed
        print(f"fashion-mnist: could not free the reviewed records' space: {exc}", file=sys.stderr)
        return
    print(
        f"Freed {freed.records_freed} reviewed records of {feedback} (the batch holds their images, the ledger "
        f"their records); {freed.files_after} record files hold the rest"
    )


def known_test_and_train(store: Store, storage: StorageParams) -> KnownImages | None:
    """The canonical images a batch must not copy: the files the champion was trained and tested on, once a
    run has verified them into the data root."""
    registry = Registry(store, storage.registry)
    champion = registry.champion()
    recorded = registry.manifest(champion).data.sources.canonical if champion else []
    known = verified_canonical_images(store, storage.data.raw, recorded)
    if known is None:
        print(f"No verified test set in {storage.data.raw} yet: the first run checks the batch for test-set images")
    return known


def announce(batch: IncomingBatch, storage: StorageParams) -> None:
    """Send the batch event that starts a retrain, when a Prefect server is there to hear it."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("No Prefect server (PREFECT_API_URL is not set): no retrain started; the next scheduled run includes it")
        return
    try:
        asyncio.run(events.announce_batch(batch, storage))
    except Exception as exc:  # the batch is in; only the announcement failed
        print(
            f"fashion-mnist: could not announce the batch to {PREFECT_API_URL.value()} ({exc}); "
            "no retrain started: the next scheduled run includes it, or run make retrain-now",
            file=sys.stderr,
        )
        return
    print(f"Announced it ({events.BATCH_ADDED}): the ad-hoc deployment retrains once batches stop arriving")


def data_root_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--data-root",
        default=None,
        help="the deployments' data root (default: FMNIST_DATA_ROOT, or data/ when run in the project folder)",
    )
    command.add_argument("--incoming", default=None, help="the incoming folder (default: <data root>/incoming)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    add = commands.add_parser("add-batch", help="check a batch and add it to the incoming folder")
    add.add_argument("folder", type=Path, help="an IDX pair, or PNG images in one folder per class")
    add.add_argument("--name", help="the batch's name in the incoming folder (default: the folder's name)")
    data_root_flags(add)
    add.set_defaults(run=cmd_add_batch)
    review = commands.add_parser("review", help="captured feedback into a folder to review; --submit adds it")
    review.add_argument("--out", type=Path, default=Path("review"), help="the review folder (default: review/)")
    review.add_argument("--submit", action="store_true", help="add the reviewed folder as a batch, and retrain")
    review.add_argument("--name", help="the batch's name (default: feedback-<time>)")
    data_root_flags(review)
    review.set_defaults(run=cmd_review)
