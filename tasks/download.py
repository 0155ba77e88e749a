"""Download stage, as a Prefect task: the verified IDX files (`fmnist.data.download`), retried with backoff
when a mirror failed in a way that may pass, and a table of where each file came from."""

from __future__ import annotations

import posixpath

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset, TransientDownloadError, download_dataset
from fmnist.storage.layout import StorageParams

RETRY_BACKOFF_S = 10.0  # before the download task's first retry; doubled for each one after


def retry_if_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """The download task's retry condition: a checksum or a missing file will not change after a pause."""
    try:
        state.result()
    except TransientDownloadError:
        return True
    except Exception:
        return False
    return False


@task(name="download", retry_condition_fn=retry_if_transient)
def download_task(
    spec: DatasetSpec, mirrors: list[str], storage: StorageParams, timeout_s: float, deadline_s: float
) -> RawDataset:
    """The one retry layer: a failed mirror passes to the next at once, and `download_with_retries`
    retries the whole task, with backoff, when a failure may pass (never after a checksum mismatch)."""
    store, logger = storage.store(), get_run_logger()
    if pruned := store.prune_scratch():
        logger.info("Deleted %d scratch copies unused for two weeks from %s", pruned, store.scratch)
    raw = download_dataset(
        spec,
        mirrors,
        store,
        storage.data.raw,
        timeout_s=timeout_s,
        deadline_s=deadline_s,
        logger=logger,
    )
    create_table_artifact(
        key="fashion-mnist-download",
        table=[{"file": posixpath.basename(f.path), "sha256": f.sha256, "source": f.source} for f in raw.files],
        description="Verified raw IDX files and where each came from",
    )
    return raw


def download_with_retries(retries: int, backoff_s: float = RETRY_BACKOFF_S) -> Task:
    """`download_task`, retried up to `retries` times on transient failures: `backoff_s`, then twice
    that, and so on, apart."""
    return download_task.with_options(retries=retries, retry_delay_seconds=exponential_backoff(backoff_s))
