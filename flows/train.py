"""The training flow: its own deployment, so training can run on a GPU worker's pool.

The retraining flow hands it small things only (the cached dataset's locations and hashes, the
parameters, the run folder's layout, where things are stored); the hosts share no disk, only the
store (a bucket, or a shared folder). The result comes back through `train_result.json` in the run
folder, not through Prefect's result storage, which another host does not share.

Nobody watches a nightly run, so the retraining flow never waits on a training run forever:
- a training run that crashed (its process died; or its host was lost, and the heartbeat automation
  of `automations.yaml` marked it Crashed) is started again, and resumes after its last saved epoch
  on whichever GPU worker takes it;
- a training run that shows no sign of life (no heartbeat, no state change) for
  `silence_timeout_s` is marked Crashed, which frees its concurrency slots, and the retraining run
  fails with what to check.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventOccurredFilter, EventResourceFilter
from prefect.states import Crashed

from fmnist.data.cache import CachedDataset
from fmnist.ops import events
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.fit import TrainResult, load_result
from fmnist.training.model import TrainParams
from fmnist.training.run_folder import RunFolder
from tasks.train import train_task

# A training run that crashed is started again, twice at most: enough for a reclaimed spot host and
# an OOM kill in one night, not a loop on a run that cannot succeed.
CRASH_RESUBMISSIONS = 2
POLL_S = 5.0


class TrainingRunFailed(RuntimeError):
    """The training flow run on the training deployment did not complete."""


class TrainingRunSilent(TrainingRunFailed):
    """The training flow run showed no sign of life for longer than allowed."""


@flow(name="train-fashion-mnist")
def train(
    cached: CachedDataset, params: TrainParams, run: RunLayout, storage: StorageParams = StorageParams()
) -> TrainResult:
    return train_task(cached=cached, params=params, run=run, storage=storage)


def last_sign_of_life(client: SyncPrefectClient, run: FlowRun) -> datetime:
    """When the run last showed it was alive: its newest event (heartbeat or state change), or state."""
    times = [run.created or datetime.now(UTC)]
    if run.state and run.state.timestamp:
        times.append(run.state.timestamp)
    newest = client.read_events(
        EventFilter(
            occurred=EventOccurredFilter(since=times[0]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        ),
        limit=1,
    ).events
    times += [event.occurred for event in newest]
    return max(times)


def silence_message(run: FlowRun, silent_s: float) -> str:
    state = run.state.name if run.state else "no state"
    if run.state and (run.state.is_scheduled() or run.state.is_pending()):
        return (
            f"training run {run.name} ({run.id}) waited {silent_s:.0f} s in state {state} and no worker took it: "
            f"check that a worker is running for work pool {run.work_pool_name} (make worker-gpu) and that the "
            "pool and the deployment are not paused or full"
        )
    return (
        f"training run {run.name} ({run.id}) has been {state} without a heartbeat or state change for "
        f"{silent_s:.0f} s: its host or worker is probably lost. Check the GPU worker's host, and that "
        "make deploy created the heartbeat automation (prefect automation ls); the run was marked Crashed "
        "so that it frees its slots"
    )


def wait_for_run(run_id: UUID, silence_timeout_s: float) -> FlowRun:
    """Wait until the flow run ends; raise `TrainingRunSilent` (after marking it Crashed) if it goes silent."""
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            silent_s = (datetime.now(UTC) - last_sign_of_life(client, run)).total_seconds()
            if silent_s > silence_timeout_s:
                message = silence_message(run, silent_s)
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                raise TrainingRunSilent(message)
            time.sleep(POLL_S)


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
    attempts = CRASH_RESUBMISSIONS + 1
    attempt = 1
    while True:
        submitted = run_deployment(deployment, parameters=parameters, timeout=0)
        flow_run = wait_for_run(submitted.id, silence_timeout_s)
        state = flow_run.state
        if state is not None and state.is_completed():
            return load_result(RunFolder(storage.store(), run))
        if state is None or not state.is_crashed() or attempt == attempts:
            raise TrainingRunFailed(
                f"training run {flow_run.name} ({flow_run.id}) on {deployment} ended "
                f"{state.name if state else 'without a state'}: {state.message if state else ''}"
            )
        message = (
            f"Training run {flow_run.name} crashed ({state.message}); starting it again "
            f"(attempt {attempt + 1} of {attempts}), to resume after its last saved epoch"
        )
        get_run_logger().warning(message)
        events.emit(events.TRAINING_RESTARTED, storage.registry, message, crashed_run=str(flow_run.id))
        attempt += 1


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
