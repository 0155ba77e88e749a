"""Prune stage: delete the run folders the retention setting no longer keeps (`fmnist.registry.retention`)."""

from __future__ import annotations

from prefect import get_run_logger, task

from fmnist.registry.retention import RetentionParams, prune_runs
from fmnist.registry.versions import Registry
from fmnist.storage.layout import StorageParams


@task(name="prune-runs")
def prune_runs_task(storage: StorageParams, retention: RetentionParams, current_run: str | None) -> list[str]:
    logger = get_run_logger()
    try:
        keep = {current_run} if current_run else set()
        deleted = prune_runs(Registry.of(storage), storage.runs, retention, keep)
    except Exception as exc:  # housekeeping: it must not fail a run that registered a model
        logger.warning("Could not prune the run folders in %s: %s", storage.runs, exc, exc_info=True)
        return []
    logger.info(
        "Deleted %d run folders from %s (keeping the newest %d, those changed within %g days, and those of "
        "registered versions and unfinished runs)",
        len(deleted),
        storage.runs,
        retention.keep_last,
        retention.keep_days,
    )
    return deleted
