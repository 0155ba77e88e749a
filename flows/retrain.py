"""The retraining flow: download -> validate -> normalize and cache -> train -> evaluate -> register."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from flows.params import RetrainParams
from flows.train import run_training
from fmnist.ops import events
from fmnist.storage.layout import StorageParams
from tasks.download import download_with_retries
from tasks.evaluate import evaluate_task
from tasks.incoming import collect_incoming_task
from tasks.normalize import normalize_task
from tasks.register import prior_run_task, register_task
from tasks.retention import prune_runs_task
from tasks.validate import validate_task


@dataclass(frozen=True)
class RetrainOutcome:
    data_key: str
    champion: str | None
    version: str | None = None  # registered by this run; None when the champion was current
    version_dir: str | None = None
    promoted: bool = False
    canary: bool = False  # made the canary (the canary policy): the rollout judge decides it
    test_accuracy: float | None = None
    run_dir: str | None = None


def report_failure(flow, flow_run, state) -> None:
    """Tell the operator (through the notification automation) why the run failed."""
    try:
        location = StorageParams.model_validate(flow_run.parameters.get("storage", {})).registry
    except ValueError:
        location = "unknown"
    message = f"Run {flow_run.name} failed: {state.message}"
    events.emit(events.RUN_FAILED, location, message, flow_run_id=str(flow_run.id))


@flow(name="retrain-fashion-mnist", on_failure=[report_failure])
def retrain(
    params: RetrainParams = RetrainParams(),
    storage: StorageParams = StorageParams(),
    training_deployment: str | None = None,
) -> RetrainOutcome:
    """`params`: what to train; `storage`: where data, models and runs live (local paths or s3:// URLs);
    `training_deployment` ('flow/deployment'): where training runs (None: in this process)."""
    raw = download_with_retries(params.download_retries)(
        spec=params.dataset,
        mirrors=params.mirrors,
        storage=storage,
        timeout_s=params.download_timeout_s,
        deadline_s=params.download_deadline_s,
    )
    incoming = collect_incoming_task(storage=storage, raw=raw, bad_batches=params.bad_batches)
    validation = validate_task(
        spec=params.dataset, raw=raw, incoming=incoming, storage=storage, drift_setting=params.drift
    )
    cached = normalize_task(spec=params.dataset, raw=raw, incoming=incoming, validation=validation, storage=storage)
    prior = prior_run_task(
        storage=storage,
        cached=cached,
        params=params.training,
        promotion=params.promotion,
        force_retrain=params.force_retrain,
    )
    if prior:
        prune_runs_task(storage=storage, retention=params.retention, current_run=flow_run.get_id())
        return RetrainOutcome(data_key=cached.key, champion=prior.champion)

    run = storage.run_layout(flow_run.get_id())
    trained = run_training(
        training_deployment,
        cached=cached,
        params=params.training,
        run=run,
        storage=storage,
        silence_timeout_s=params.training_silence_timeout_s,
    )
    evaluation = evaluate_task(trained=trained, cached=cached, storage=storage)
    registration = register_task(
        storage=storage,
        raw=raw,
        cached=cached,
        params=params.training,
        trained=trained,
        evaluation=evaluation,
        promotion=params.promotion,
    )
    prune_runs_task(storage=storage, retention=params.retention, current_run=flow_run.get_id())
    return RetrainOutcome(
        data_key=cached.key,
        champion=registration.champion,
        version=registration.version,
        version_dir=registration.version_dir,
        promoted=registration.promoted,
        canary=registration.canary,
        test_accuracy=evaluation.test_accuracy,
        run_dir=run.location,
    )
