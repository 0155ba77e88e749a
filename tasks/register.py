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
from fmnist.registry.manifest import RunManifest, build_manifest, fingerprint, per_class_table
from fmnist.registry.registration import PriorRun, Registration, prior_run, register_model
from fmnist.registry.versions import PromotionParams, Registry
from fmnist.storage.layout import StorageParams
from fmnist.training.fit import TrainResult
from fmnist.training.model import TrainParams


def run_report(registration: Registration, manifest: RunManifest) -> str:
    """The run's markdown report in the Prefect UI: data, metrics, the decision and where things are."""
    decision = registration.decision
    champion = decision.champion_version
    data, metrics = manifest.data, manifest.metrics
    incoming = data.sources.incoming
    compared = (
        f"| test accuracy | {decision.candidate_accuracy:.4f} | {decision.champion_accuracy:.4f} |"
        if champion
        else f"| test accuracy | {decision.candidate_accuracy:.4f} | (no champion yet) |"
    )
    outcome = "promoted to champion" if registration.promoted else "registered, not promoted"
    batches = f"{len(incoming)} incoming batch{'' if len(incoming) == 1 else 'es'}"
    # One line each: the Prefect UI renders a line break inside a paragraph as a break.
    losses = (
        f"Test loss {metrics.test_loss:.4f}; train accuracy {metrics.train_accuracy:.4f}; "
        f"train-test gap {metrics.train_test_gap:+.4f}."
    )
    data_line = (
        f"**Data**: key `{data.cache_key[:16]}`, {data.train_rows:,} training rows ({batches}), "
        f"{data.test_rows:,} test rows."
    )
    return f"""# {registration.version} {outcome}

**Decision**: {decision.reason}. Floor {decision.floor:.4f}, tolerance {decision.tolerance:.4f}.
Champion now: **{registration.champion or "none"}**.

| | candidate {registration.version} | champion before{f" ({champion})" if champion else ""} |
| --- | ---: | ---: |
{compared}

{losses}

{data_line}

{per_class_table(manifest.per_class)}

**Files**: `{registration.version_dir}` (model.keras, model_card.md, manifest.json, metrics.json, history.json, plots).
"""


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
    if prior.promoted:
        events.emit(
            events.MODEL_PROMOTED, storage.registry, prior.message, version=prior.version, champion=prior.champion
        )
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
    summary = (
        f"{registration.version} (test accuracy {evaluation.test_accuracy:.4f}) "
        f"{'promoted to champion' if registration.promoted else 'registered but kept back'}: "
        f"{registration.decision.reason}; champion is {registration.champion or 'none'}"
    )
    get_run_logger().info("Registered %s", summary)
    events.emit(
        events.MODEL_PROMOTED if registration.promoted else events.MODEL_KEPT_BACK,
        storage.registry,
        summary,
        version=registration.version,
        champion=registration.champion,
        test_accuracy=evaluation.test_accuracy,
    )
    return registration
