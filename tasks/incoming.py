"""Collect stage: the labeled batches waiting in the incoming folder (`fmnist.data.incoming`), screened."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from fmnist.data.download import RawDataset
from fmnist.data.incoming import BadBatches, IncomingBatch, dispose, known_images, screen_incoming
from fmnist.ops import events
from fmnist.storage.layout import StorageParams


@task(name="collect-incoming")
def collect_incoming_task(storage: StorageParams, raw: RawDataset, bad_batches: BadBatches) -> list[IncomingBatch]:
    """The incoming batches a run may train on: readable, free of test-set images, within the contract.

    A batch that is not fails the run (`bad_batches="fail"`), or is moved to the quarantine folder with
    its error beside it, so this run and the next train on the rest (`"quarantine"`).
    """
    store, logger = storage.store(), get_run_logger()
    screening = screen_incoming(
        store,
        storage.incoming,
        known_images(store, raw.test_images.file, raw.train_images.file),
        receipts=storage.data.screened,
        outcomes=storage.data.outcomes,
    )
    if ignored := screening.ignored_message(storage.incoming):
        logger.warning("%s", ignored)
    for line in screening.repeats:
        logger.warning("Incoming batch %s", line)
    rows = [
        {"batch": b.name, "kind": b.kind, "rows": b.rows, "status": "used", "note": b.sha256[:12]}
        for b in screening.batches
    ]
    for refused in screening.refused:
        note = f"Quarantined by flow run {flow_run.get_id()}."
        disposal = dispose(store, refused, bad_batches, storage.quarantine, note)
        if disposal.left_because:
            logger.error("%s\n%s; this run trains on the other batches", refused.error, disposal.left_because)
        elif disposal.moved_to:
            message = f"{refused.error}\nMoved to {disposal.moved_to}; this run trains on the other batches"
            logger.warning("%s", message)
            events.emit(
                events.BATCH_QUARANTINED, storage.incoming, message, batch=refused.name, moved_to=disposal.moved_to
            )
        rows.append({"batch": refused.name, "kind": "", "rows": 0, "status": disposal.status, "note": refused.error})
    if rows:
        create_table_artifact(
            key="incoming-batches", table=rows, description="Incoming batches: used, or quarantined and why"
        )
    if bad_batches == "fail":
        screening.raise_for_refused()
    if not screening.batches:
        logger.info("No incoming batches to use in %s", storage.incoming)
    for batch in screening.batches:
        logger.info("Incoming batch %s: %d %s images, sha256 %s", batch.name, batch.rows, batch.kind, batch.sha256[:12])
    return screening.batches
