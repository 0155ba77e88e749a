"""Train stage, as a Prefect task: `fmnist.training.fit` with a progress artifact, retried once unless the
failure is hopeless (no GPU where one is required, a model at chance level, a run ended by someone else).

At each epoch's end the task reports progress and checks that its flow run is still Running. Both go
through the Prefect API, and training does not stop when it is away: the epoch is not reported, and
training goes on."""

from __future__ import annotations

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.client.orchestration import get_client

from fmnist.data.cache import CachedDataset
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.devices import NoGpuError
from fmnist.training.fit import ChanceLevelError, TrainResult, save_result, train_model
from fmnist.training.model import TrainParams
from fmnist.training.run_folder import RunFolder
from fmnist.training.supervision import TrainingRunSuperseded, api_unreachable, check_still_running


def _retry_unless_hopeless(task, task_run, state) -> bool:
    """Retry crashes and transient errors, not a missing GPU, a model that cannot learn, or a run that
    another one has replaced."""
    hopeless = NoGpuError | ChanceLevelError | TrainingRunSuperseded
    return not isinstance(state.result(raise_on_failure=False), hopeless)


@task(name="train", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_hopeless)
def train_task(cached: CachedDataset, params: TrainParams, run: RunLayout, storage: StorageParams) -> TrainResult:
    logger = get_run_logger()
    progress = create_progress_artifact(
        progress=0.0, key="training-progress", description=f"Training {params.preset}: {params.epochs} epochs"
    )

    def report(done: int, epochs: int, metrics: dict) -> None:
        try:
            update_progress_artifact(
                progress,
                progress=100.0 * done / epochs,
                description=f"Epoch {done}/{epochs}: loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}",
            )
            if flow_run_id := runtime.flow_run.id:
                with get_client(sync_client=True) as client:
                    check_still_running(client, flow_run_id)
        except Exception as exc:
            if not api_unreachable(exc):
                raise
            logger.warning(
                "The Prefect API is not answering (%r): epoch %d/%d not reported; training goes on", exc, done, epochs
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
