"""Register stage: publish the evaluated model as a new registry version and apply the promotion gate;
and, before training, what became of an earlier run of the same data, code and parameters."""

from __future__ import annotations

from dataclasses import dataclass

from fmnist.evaluation.evaluate import Evaluation
from fmnist.registry.gate import PromotionParams
from fmnist.registry.manifest import Decision, RunManifest, model_card, per_class_table
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import MODEL, Registered, Registry, RegistryError
from fmnist.storage.layout import RunLayout
from fmnist.training.fit import TrainResult


@dataclass(frozen=True)
class Registration:
    version: str
    version_dir: str  # its location in the registry
    decision: Decision  # the gate's verdict that counted
    promoted: bool  # whether it became champion
    champion: str | None  # after this registration
    canary: bool = False  # whether it passed under the canary policy and its rollout started

    @property
    def outcome(self) -> str:
        """What happened, in words: promoted, canary or kept back."""
        return "promoted" if self.promoted else "canary" if self.canary else "kept back"


def register_model(
    registry: Registry,
    trained: TrainResult,
    evaluation: Evaluation,
    manifest: RunManifest,
    promotion: PromotionParams,
) -> Registration:
    """Publish the run's model, history, metrics and plots as a new version; apply the gate."""
    if trained.model.sha256 != evaluation.model_sha256:
        raise RegistryError(
            f"{trained.model.location} hashes to {trained.model.sha256}, but the evaluation is of the model "
            f"{evaluation.model_sha256}: not registering a model whose numbers are another's"
        )
    files = {
        MODEL: trained.model,
        RunLayout.HISTORY: trained.history,
        RunLayout.METRICS: evaluation.metrics,
        **{f"{name}.png": png for name, png in evaluation.plots.items()},
        **evaluation.saved_model,
    }
    if evaluation.test_predictions:  # the judge's expected agreement between this version and another
        files[RunLayout.TEST_PREDICTIONS] = evaluation.test_predictions
    registered = _start_canary(registry, registry.register(files, manifest, promotion, model_card=model_card))
    return Registration(
        version=registered.version,
        version_dir=registry.version_dir(registered.version),
        decision=registered.decision,
        promoted=registered.promoted,
        champion=registered.champion,
        canary=registered.canary,
    )


def _start_canary(registry: Registry, registered: Registered) -> Registered:
    """Start the canary rollout of a version the canary policy held back from promotion."""
    if registered.canary:
        Rollouts(registry).start(registered.version, registered.decision)
    return registered


@dataclass(frozen=True)
class PriorRun:
    """A version already registered from the same data, code and parameters: no reason to train again."""

    version: str
    champion: str | None  # after this check (which may have promoted `version`)
    promoted: bool  # whether this check made `version` champion
    message: str
    canary: bool = False  # whether this check started `version`'s canary rollout


def prior_run(registry: Registry, run_fingerprint: str, promotion: PromotionParams) -> PriorRun | None:
    """What became of an earlier run of this fingerprint, if any; None: train.

    A version kept back stays kept back (training it again would only reroll the dice against the
    gate); one that was champion and was replaced (a rollback) is not put back behind the operator's
    back, nor one rolled back (or superseded) in its canary; one being rolled out is left to its judge;
    one that passed the gate but never became champion (its run stopped before the pointer moved) is gated
    again against today's champion and promoted if it passes (or, under the canary policy, made the canary).
    """
    champion = registry.champion()
    manifest = registry.prior_version(run_fingerprint)
    if manifest is None:
        return None
    version = manifest.version
    same = "was trained from the same data, code and parameters"
    if version == champion:
        if registry.damaged_files(version):
            return None  # the champion's files are damaged: train a replacement
        message = f"Champion {version} is current: trained from the same data, code and parameters. Nothing retrained."
        return PriorRun(version, champion, False, message)
    gate = manifest.gate
    if not gate.passed:
        return PriorRun(
            version,
            champion,
            False,
            f"{version} {same} and was kept back ({gate.reason}). Nothing retrained; "
            "set force_retrain to train it again.",
        )
    rollouts = Rollouts(registry)
    if ended := rollouts.ended_without_promotion(version):
        return PriorRun(
            version,
            champion,
            False,
            f"{version} {same} and was {ended}. Nothing retrained; `fashion-mnist promote {version}` puts it "
            "in service by hand, force_retrain trains it again.",
        )
    if version in registry.ever_champion():
        return PriorRun(
            version,
            champion,
            False,
            f"{version} {same}; it was champion and was replaced (champion now: {champion}). Nothing retrained; "
            f"`fashion-mnist promote {version}` puts it back in service.",
        )
    if (active := rollouts.active()) is not None and active.version == version:
        return PriorRun(
            version,
            champion,
            False,
            f"{version} {same} and is the canary of the rollout in progress (started {active.started_at}): "
            "the rollout judge decides it. Nothing retrained.",
        )
    registered = _start_canary(registry, registry.promote_registered(version, promotion))
    outcome = "promoted it" if registered.promoted else "made it the canary" if registered.canary else "kept it back"
    return PriorRun(
        version,
        registered.champion,
        registered.promoted,
        f"{version} {same} and passed the gate, but never became champion (its run stopped first, or another "
        f"version won); gated again against {champion or 'no champion'}: {registered.decision.reason}; "
        f"{outcome}. Nothing retrained.",
        canary=registered.canary,
    )


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
    outcome = {
        "promoted": "promoted to champion",
        "canary": "registered as the canary (its rollout has started)",
        "kept back": "registered, not promoted",
    }[registration.outcome]
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
