"""Register stage: store the evaluated model as a new registry version and apply the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fmnist import events, lineage
from fmnist.cache import CachedDataset
from fmnist.files import sha256_text
from fmnist.layout import StorageParams
from fmnist.model import TrainParams
from fmnist.registry import Decision, Registry, RegistryError, gate_of
from tasks.evaluate import Evaluation
from tasks.train import TrainResult


@dataclass(frozen=True)
class Registration:
    version: str
    version_dir: str  # its location in the registry
    decision: Decision  # the gate's verdict that counted
    promoted: bool  # whether it became champion
    champion: str | None  # after this registration


def fingerprint(cache_key: str, params: TrainParams) -> str:
    """Same data, same code, same parameters: same fingerprint, and no reason to train again."""
    return sha256_text("run", cache_key, lineage.code_sha256(), params.model_dump_json())


def test_set_id(test_images_sha256: str, test_labels_sha256: str) -> str:
    """Identity of the test set: only models measured on the same one are compared."""
    return sha256_text("test-set", test_images_sha256, test_labels_sha256)


def build_manifest(
    *,
    run_fingerprint: str,
    cached: CachedDataset,
    test_set: str,
    params: TrainParams,
    trained: TrainResult,
    evaluation: Evaluation,
    flow_run_id: str | None,
) -> dict:
    return {
        "fingerprint": run_fingerprint,
        "flow_run_id": flow_run_id,
        "data": {
            "cache_key": cached.key,
            "test_set": test_set,
            "train_rows": cached.train.rows,
            "test_rows": cached.test.rows,
            "train_parquet_sha256": cached.train.sha256,
            "test_parquet_sha256": cached.test.sha256,
            "sources": cached.sources,
        },
        "params": params.model_dump(),
        "code": {"sha256": lineage.code_sha256(), "git_commit": lineage.git_commit()},
        # Of the machine that trained: the orchestrating flow may run on another host.
        "libraries": trained.libraries,
        "hardware": {**trained.host, "device": trained.device, "mixed_precision": trained.mixed_precision},
        "training": {"epochs": trained.epochs, "seconds_per_epoch": trained.seconds_per_epoch},
        "metrics": {
            k: getattr(evaluation, k)
            for k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss", "train_test_gap")
        },
        "per_class": evaluation.per_class,
    }


def per_class_table(per_class: list[dict]) -> str:
    """Markdown table of each class's precision, recall, F1 and support."""
    rows = [
        f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
        for c in per_class
    ]
    return "\n".join(["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |", *rows])


def model_card(manifest: dict) -> str:
    """The version's card, from its final manifest (which holds its number and the gate's verdict)."""
    metrics = manifest["metrics"]
    gate = manifest["gate"]
    params = manifest["params"]
    weakest = sorted(manifest["per_class"], key=lambda c: c["f1"])[:3]
    code = manifest["code"]["git_commit"] or manifest["code"]["sha256"][:12]
    return f"""# Fashion-MNIST classifier {manifest["version"]}

**Model**: `{params["preset"]}` preset, {params["epochs"]} epochs, batch {params["batch_size"]}, Adam \
{params["learning_rate"]}, dropout {params["dropout"]}, seed {params["seed"]}.
**Input**: 28x28 grayscale images scaled to [0, 1] (pixel / 255). **Output**: probabilities of the 10
Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot).

**Data**: the canonical 60,000 training images plus incoming batches ({manifest["data"]["train_rows"]:,} rows);
evaluated on the fixed canonical test set ({manifest["data"]["test_rows"]:,} images). Data key
`{manifest["data"]["cache_key"][:16]}`.

**Metrics**: test accuracy {metrics["test_accuracy"]:.4f}, test loss {metrics["test_loss"]:.4f}, train-test gap
{metrics["train_test_gap"]:+.4f}.

{per_class_table(manifest["per_class"])}

**Promotion gate**: {"passed" if gate["passed"] else "not passed"}: {gate["reason"]}.

**Trained on**: {manifest["hardware"]["device"]}; code {code};
TensorFlow {manifest["libraries"]["tensorflow"]}, Keras {manifest["libraries"]["keras"]}.

**Limits**: trained on centred, 28x28 product photos on a plain background; other images (photos of
worn clothes, other framings) are out of distribution. Its weakest classes on the test set (lowest F1):
{", ".join(f"{c['class']} ({c['f1']:.3f})" for c in weakest)}.
"""


def register_model(
    registry: Registry,
    trained: TrainResult,
    evaluation: Evaluation,
    manifest: dict,
    *,
    floor: float,
    tolerance: float,
    force: bool,
) -> Registration:
    """Publish the run's model, history, metrics and plots as a new version; apply the gate."""
    if trained.model.sha256 != evaluation.model_sha256:
        raise RegistryError(
            f"{trained.model.location} hashes to {trained.model.sha256}, but the evaluation is of the model "
            f"{evaluation.model_sha256}: not registering a model whose numbers are another's"
        )
    files = {
        "model.keras": trained.model,
        "history.json": trained.history,
        "metrics.json": evaluation.metrics,
        **{f"{name}.png": png for name, png in evaluation.plots.items()},
    }
    registered = registry.register(
        files, manifest, floor=floor, tolerance=tolerance, force=force, model_card=model_card
    )
    return Registration(
        version=registered.version,
        version_dir=registry.version_dir(registered.version),
        decision=registered.decision,
        promoted=registered.promoted,
        champion=registered.champion,
    )


def run_report(registration: Registration, manifest: dict, evaluation: Evaluation) -> str:
    """The run's markdown report in the Prefect UI: data, metrics, the decision and where things are."""
    decision = registration.decision
    champion = decision.champion_version
    data = manifest["data"]
    incoming = data["sources"].get("incoming", {})
    compared = (
        f"| test accuracy | {decision.candidate_accuracy:.4f} | {decision.champion_accuracy:.4f} |"
        if champion
        else f"| test accuracy | {decision.candidate_accuracy:.4f} | (no champion yet) |"
    )
    outcome = "promoted to champion" if registration.promoted else "registered, not promoted"
    batches = f"{len(incoming)} incoming batch{'' if len(incoming) == 1 else 'es'}"
    # One line each: the Prefect UI renders a line break inside a paragraph as a break.
    losses = (
        f"Test loss {evaluation.test_loss:.4f}; train accuracy {evaluation.train_accuracy:.4f}; "
        f"train-test gap {evaluation.train_test_gap:+.4f}."
    )
    data_line = (
        f"**Data**: key `{data['cache_key'][:16]}`, {data['train_rows']:,} training rows ({batches}), "
        f"{data['test_rows']:,} test rows."
    )
    return f"""# {registration.version} {outcome}

**Decision**: {decision.reason}. Floor {decision.floor:.4f}, tolerance {decision.tolerance:.4f}.
Champion now: **{registration.champion or "none"}**.

| | candidate {registration.version} | champion before{f" ({champion})" if champion else ""} |
| --- | ---: | ---: |
{compared}

{losses}

{data_line}

{per_class_table(evaluation.per_class)}

**Files**: `{registration.version_dir}` (model.keras, model_card.md, manifest.json, metrics.json, history.json, plots).
"""


@dataclass(frozen=True)
class PriorRun:
    """A version already registered from the same data, code and parameters: no reason to train again."""

    version: str
    champion: str | None  # after this check (which may have promoted `version`)
    promoted: bool  # whether this check made `version` champion
    message: str


def prior_run(registry: Registry, run_fingerprint: str, *, floor: float, tolerance: float) -> PriorRun | None:
    """What became of an earlier run of this fingerprint, if any; None: train.

    A version kept back stays kept back (training it again would only reroll the dice against the
    gate); one that was champion and was replaced (a rollback) is not put back behind the operator's
    back; one that passed the gate but never became champion (its run stopped before the pointer
    moved) is gated again against today's champion and promoted if it passes.
    """
    champion = registry.champion()
    manifest = registry.prior_version(run_fingerprint)
    if manifest is None:
        return None
    version = manifest["version"]
    same = "was trained from the same data, code and parameters"
    if version == champion:
        if registry.damaged_files(version):
            return None  # the champion's files are damaged: train a replacement
        message = f"Champion {version} is current: trained from the same data, code and parameters. Nothing retrained."
        return PriorRun(version, champion, False, message)
    gate = gate_of(manifest)
    if not gate["passed"]:
        return PriorRun(
            version,
            champion,
            False,
            f"{version} {same} and was kept back ({gate['reason']}). Nothing retrained; "
            "set force_retrain to train it again.",
        )
    if version in registry.ever_champion():
        return PriorRun(
            version,
            champion,
            False,
            f"{version} {same}; it was champion and was replaced (champion now: {champion}). Nothing retrained; "
            f"`fashion-mnist promote {version}` puts it back in service.",
        )
    registered = registry.promote_registered(version, floor=floor, tolerance=tolerance)
    outcome = "promoted it" if registered.promoted else "kept it back"
    return PriorRun(
        version,
        registered.champion,
        registered.promoted,
        f"{version} {same} and passed the gate, but never became champion (its run stopped first, or another "
        f"version won); gated again against {champion or 'no champion'}: {registered.decision.reason}; "
        f"{outcome}. Nothing retrained.",
    )


@task(name="check-registered")
def prior_run_task(storage: StorageParams, run_fingerprint: str, floor: float, tolerance: float) -> PriorRun | None:
    """An earlier version of the same data, code and parameters, and what became of it (None: train)."""
    prior = prior_run(Registry(storage.store(), storage.registry), run_fingerprint, floor=floor, tolerance=tolerance)
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
    trained: TrainResult,
    evaluation: Evaluation,
    manifest: dict,
    floor: float,
    tolerance: float,
    force: bool,
) -> Registration:
    registry = Registry(storage.store(), storage.registry)
    registration = register_model(
        registry, trained, evaluation, manifest, floor=floor, tolerance=tolerance, force=force
    )
    create_markdown_artifact(
        key="retrain-report",
        markdown=run_report(registration, manifest, evaluation),
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
