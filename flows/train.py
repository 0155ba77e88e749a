"""The training flow: its own deployment, so training can run on a GPU worker's pool.

The retraining flow hands it small things only (the cached dataset's locations and hashes, the
parameters, the run folder's location, where things are stored); the hosts share no disk, only the
store (a bucket, or a shared folder). The result comes back through `train_result.json` in the run
folder, not through Prefect's result storage, which another host does not share.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from fmnist.cache import CachedDataset
from fmnist.layout import StorageParams
from fmnist.model import TrainParams
from fmnist.run_folder import RunFolder
from tasks.train import TrainResult, load_result, train_task

# A training run that crashed (its process died: OOM kill, lost worker process) is started once
# more; it writes into the same run folder, so it resumes after its last saved epoch.
CRASH_RESUBMISSIONS = 1


class TrainingRunFailed(RuntimeError):
    """The training flow run on the training deployment did not complete."""


@flow(name="train-fashion-mnist")
def train(
    cached: CachedDataset, params: TrainParams, run_dir: str, storage: StorageParams = StorageParams()
) -> TrainResult:
    return train_task(cached=cached, params=params, run_dir=run_dir, storage=storage)


def train_on_deployment(
    deployment: str, cached: CachedDataset, params: TrainParams, run_dir: str, storage: StorageParams
) -> TrainResult:
    """Run the training flow on `deployment` (e.g. on the GPU pool), wait for it, and check its end."""
    parameters = {
        "cached": asdict(cached),
        "params": params.model_dump(),
        "run_dir": run_dir,
        "storage": storage.model_dump(),
    }
    attempts = CRASH_RESUBMISSIONS + 1
    for attempt in range(1, attempts + 1):
        flow_run = run_deployment(deployment, parameters=parameters, timeout=None)
        state = flow_run.state
        if state is not None and state.is_completed():
            return load_result(RunFolder(storage.store(), run_dir))
        if state is None or not state.is_crashed() or attempt == attempts:
            raise TrainingRunFailed(
                f"training run {flow_run.name} ({flow_run.id}) on {deployment} ended "
                f"{state.name if state else 'without a state'}: {state.message if state else ''}"
            )
        get_run_logger().warning(
            "Training run %s crashed (%s); starting it again, to resume after its last saved epoch",
            flow_run.name,
            state.message,
        )
