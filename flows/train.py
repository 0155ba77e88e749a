"""The training flow: its own deployment, so training can run on a GPU worker's pool.

The retraining flow hands it small things only (the cached dataset's locations and hashes, the
parameters, the run folder's layout, where things are stored); the hosts share no disk, only the
store (a bucket, or a shared folder). The result comes back through `train_result.json` in the run
folder, not through Prefect's result storage, which another host does not share.

Waiting on a run of the training deployment, and starting it again after a crash, is
`fmnist.training.supervision`'s.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from fmnist.data.cache import CachedDataset
from fmnist.ops import events
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.fit import TrainResult, load_result
from fmnist.training.model import TrainParams
from fmnist.training.run_folder import RunFolder
from fmnist.training.supervision import fence_late_start, supervise, wait_for_run
from tasks.train import train_task


@flow(name="train-fashion-mnist")
def train(
    cached: CachedDataset, params: TrainParams, run: RunLayout, storage: StorageParams = StorageParams()
) -> TrainResult:
    # A run declared dead before it started may start late, beside the run started in its place: fenced.
    fence_late_start(flow_run.id)
    return train_task(cached=cached, params=params, run=run, storage=storage)


def train_on_deployment(
    deployment: str,
    cached: CachedDataset,
    params: TrainParams,
    run: RunLayout,
    storage: StorageParams,
    silence_timeout_s: float,
) -> TrainResult:
    """Run the training flow on `deployment` (e.g. on the GPU pool), wait for it, and check its end."""
    parameters = {
        "cached": asdict(cached),
        "params": params.model_dump(),
        "run": asdict(run),
        "storage": storage.model_dump(),
    }

    def restarted(crashed: FlowRun, message: str) -> None:
        get_run_logger().warning(message)
        events.emit(events.TRAINING_RESTARTED, storage.registry, message, crashed_run=str(crashed.id))

    supervise(
        submit=lambda: run_deployment(deployment, parameters=parameters, timeout=0).id,
        wait=lambda run_id: wait_for_run(run_id, silence_timeout_s, waiter=flow_run.id, logger=get_run_logger()),
        where=deployment,
        on_restart=restarted,
    )
    return load_result(RunFolder(storage.store(), run))


def run_training(
    deployment: str | None,
    *,
    cached: CachedDataset,
    params: TrainParams,
    run: RunLayout,
    storage: StorageParams,
    silence_timeout_s: float,
) -> TrainResult:
    """Train on `deployment` ('flow/deployment', e.g. on the GPU pool), or in this process when None."""
    if deployment is None:
        return train(cached=cached, params=params, run=run, storage=storage)
    return train_on_deployment(deployment, cached, params, run, storage, silence_timeout_s)
