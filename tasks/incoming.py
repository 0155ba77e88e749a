"""Collect stage: the labeled batches waiting in the incoming folder (`fmnist.incoming`)."""

from __future__ import annotations

from prefect import get_run_logger, task

from fmnist.incoming import IncomingBatch, collect_incoming
from fmnist.layout import StorageParams
from tasks.download import RawDataset


def input_hashes(raw: RawDataset, incoming: list[IncomingBatch]) -> list[str]:
    """What the data stages' cache keys are made of: the canonical files' and each batch's content."""
    return [f.sha256 for f in raw.files] + [f"{b.name}:{b.sha256}" for b in incoming]


@task(name="collect-incoming")
def collect_incoming_task(storage: StorageParams) -> list[IncomingBatch]:
    batches = collect_incoming(storage.store(), storage.incoming)
    logger = get_run_logger()
    if not batches:
        logger.info("No incoming batches in %s", storage.incoming)
    for batch in batches:
        logger.info("Incoming batch %s: %d %s images, sha256 %s", batch.name, batch.rows, batch.kind, batch.sha256[:12])
    return batches
