"""The retraining flow: download -> validate -> normalize and cache -> train -> evaluate (-> register)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from prefect import flow
from prefect.runtime import flow_run

from flows.params import RetrainParams
from tasks.download import download_task
from tasks.evaluate import evaluate_task
from tasks.incoming import collect_incoming_task
from tasks.normalize import normalize_task
from tasks.train import train_task
from tasks.validate import validate_task


@dataclass(frozen=True)
class RetrainOutcome:
    data_key: str
    run_dir: str
    model_path: str
    test_accuracy: float


@flow(name="retrain-fashion-mnist")
def retrain(params: RetrainParams = RetrainParams()) -> RetrainOutcome:
    layout = params.layout
    # The flow run's id names its folder, so a retried run finds its own training backup.
    run_dir = params.run_dir(flow_run.get_id() or uuid.uuid4().hex)
    raw = download_task(
        spec=params.dataset,
        mirrors=params.mirrors,
        raw_dir=layout.raw,
        timeout_s=params.download_timeout_s,
        retries=params.download_retries,
    )
    incoming = collect_incoming_task(incoming_dir=params.incoming_path)
    validation = validate_task(spec=params.dataset, raw=raw, incoming=incoming, validation_dir=layout.validation)
    cached = normalize_task(
        spec=params.dataset,
        raw=raw,
        incoming=incoming,
        validation=validation,
        cache_dir=layout.cache,
        validation_dir=layout.validation,
    )
    trained = train_task(cached=cached, params=params.training, run_dir=run_dir)
    evaluation = evaluate_task(trained=trained, cached=cached, out_dir=run_dir / "evaluation")
    return RetrainOutcome(
        data_key=cached.key,
        run_dir=str(run_dir),
        model_path=trained.model_path,
        test_accuracy=evaluation.test_accuracy,
    )


if __name__ == "__main__":
    outcome = retrain()
    print(f"Test accuracy {outcome.test_accuracy:.4f}; model: {outcome.model_path}")
    print(f"Run folder (metrics, plots, TensorBoard logs): {outcome.run_dir}")
