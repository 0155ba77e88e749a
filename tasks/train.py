"""Train stage, as a Prefect task: `fmnist.training.fit` with a progress artifact, retried once unless the
failure is hopeless (no GPU where one is required, a model at chance level)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from fmnist.data.cache import CachedDataset
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.fit import ChanceLevelError, NoGpuError, TrainResult, save_result, train_model
from fmnist.training.model import TrainParams
from fmnist.training.run_folder import RunFolder


def _retry_unless_hopeless(task, task_run, state) -> bool:
    """Retry crashes and transient errors, not a missing GPU or a model that cannot learn."""
    return not isinstance(state.result(raise_on_failure=False), NoGpuError | ChanceLevelError)


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_hopeless)
def train_task(cached: CachedDataset, params: TrainParams, run: RunLayout, storage: StorageParams) -> TrainResult:
    logger = get_run_logger()
    progress = create_progress_artifact(
        progress=0.0, key="training-progress", description=f"Training {params.preset}: {params.epochs} epochs"
    )

    def report(done: int, epochs: int, metrics: dict) -> None:
        update_progress_artifact(
            progress,
            progress=100.0 * done / epochs,
            description=f"Epoch {done}/{epochs}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}",
        )

    store = storage.store()
    if pruned := store.prune_scratch():
        logger.info("Deleted %d scratch copies unused for two weeks from %s", pruned, store.scratch)
    folder = RunFolder(store, run)
    result = train_model(cached, params, folder, on_epoch=report, logger=logger)
    save_result(folder, result)
    logger.info(
        "Trained %d epochs on %s, %.2f s an epoch; model %s",
        result.epochs,
        result.device,
        result.seconds_per_epoch,
        result.model.location,
    )
    return result
