"""Register stage, as Prefect tasks: the nothing-changed check before training, and the registration
(`fmnist.registry.registration`) with the run's report as an artifact and an event for the operator."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from fmnist.data.cache import CachedDataset
from fmnist.data.download import RawDataset
from fmnist.data.feedback import feedback_lineage
from fmnist.evaluation.evaluate import Evaluation
from fmnist.ops import events
from fmnist.registry.gate import PromotionParams
from fmnist.registry.manifest import build_manifest, fingerprint
from fmnist.registry.registration import PriorRun, Registration, prior_run, register_model, run_report
from fmnist.registry.versions import Registry
from fmnist.storage.layout import StorageParams
from fmnist.training.fit import TrainResult
from fmnist.training.model import TrainParams


@task(name="check-registered")
def prior_run_task(
    storage: StorageParams,
    cached: CachedDataset,
    params: TrainParams,
    promotion: PromotionParams,
    force_retrain: bool = False,
) -> PriorRun | None:
    """An earlier version of the same data, code and parameters, and what became of it (None: train)."""
    if force_retrain:
        get_run_logger().info("force_retrain is set: training whatever was registered before")
        return None
    run_fingerprint = fingerprint(cached.key, params)
    prior = prior_run(Registry.of(storage), run_fingerprint, promotion)
    if prior is None:
        return None
    get_run_logger().info(prior.message)
    create_markdown_artifact(key="retrain-report", markdown=f"# {prior.message}\n\nFingerprint `{run_fingerprint}`.")
    facts = {"version": prior.version, "champion": prior.champion}
    if prior.promoted:
        events.emit(events.MODEL_PROMOTED, storage.registry, prior.message, **facts)
    elif prior.canary:
        events.emit_rollout_started(storage, prior.message, **facts)
    return prior


@task(name="register")
def register_task(
    storage: StorageParams,
    raw: RawDataset,
    cached: CachedDataset,
    params: TrainParams,
    trained: TrainResult,
    evaluation: Evaluation,
    promotion: PromotionParams,
) -> Registration:
    feedback = feedback_lineage(storage.store(), storage.data.feedback, cached.sources["incoming"])
    if feedback.unreadable_ledgers:
        get_run_logger().warning(
            "The review ledgers of %s in %s do not parse: the lineage does not count them",
            ", ".join(feedback.unreadable_ledgers),
            storage.data.feedback,
        )
    manifest = build_manifest(
        raw=raw,
        cached=cached,
        params=params,
        trained=trained,
        evaluation=evaluation,
        flow_run_id=flow_run.get_id(),
        feedback=feedback,
    )
    registration = register_model(Registry.of(storage), trained, evaluation, manifest, promotion)
    create_markdown_artifact(
        key="retrain-report",
        markdown=run_report(registration, manifest),
        description="Data, metrics, the promotion decision and where the version lives",
    )
    what = {
        "promoted": ("promoted to champion", events.MODEL_PROMOTED),
        "canary": ("made the canary (its rollout started; the rollout judge decides)", events.ROLLOUT_STARTED),
        "kept back": ("registered but kept back", events.MODEL_KEPT_BACK),
    }
    outcome, event = what[registration.outcome]
    summary = (
        f"{registration.version} (test accuracy {evaluation.test_accuracy:.4f}) {outcome}: "
        f"{registration.decision.reason}; champion is {registration.champion or 'none'}"
    )
    get_run_logger().info("Registered %s", summary)
    facts = {"version": registration.version, "champion": registration.champion}
    if event == events.ROLLOUT_STARTED:
        events.emit_rollout_started(storage, summary, **facts, test_accuracy=evaluation.test_accuracy)
    else:
        events.emit(event, storage.registry, summary, **facts, test_accuracy=evaluation.test_accuracy)
    return registration
