"""A model version's manifest, typed: what it was made from, how it did, on what, and the gate's verdict.

A run builds a `RunManifest` (`build_manifest`); the registry publishes it as a `VersionManifest`
(`manifest.json` in the version's folder) with its number, the gate's verdict and every file's
sha256. The gate, the model card, the CLI and run retention read manifests through these models.
Unknown fields are kept, so a manifest written by a newer version of the code survives a round trip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fmnist.data.dataset import CLASS_NAMES
from fmnist.evaluation.estimates import Calibration
from fmnist.storage import UnsafeName, name_parts
from fmnist.storage.files import sha256_text
from fmnist.training import lineage

if TYPE_CHECKING:
    from fmnist.data.cache import CachedDataset
    from fmnist.data.download import RawDataset
    from fmnist.data.feedback import FeedbackLineage
    from fmnist.evaluation.evaluate import Evaluation
    from fmnist.training.fit import TrainResult
    from fmnist.training.model import TrainParams


@dataclass(frozen=True)
class Decision:
    """The promotion gate's verdict on a candidate, and the numbers it compared."""

    passed: bool
    reason: str
    candidate_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    floor: float
    tolerance: float
    # The best champion so far on the same test set, when better than the one in service: the
    # tolerance is measured from it, so it cannot accumulate over a chain of promotions.
    best_version: str | None = None
    best_accuracy: float | None = None


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow", populate_by_name=True)


class Sources(_Record):
    canonical: list[str] = Field(default_factory=list, description="sha256 of each canonical IDX file")
    incoming: dict[str, str] = Field(default_factory=dict, description="each incoming batch's content hash")


class FeedbackRecord(_Record):
    """The reviewed feedback among a version's training data (`fmnist.data.feedback`)."""

    reviewed_batches: list[str] = Field(default_factory=list, description="batches `review --submit` added")
    reviewed_images: int = 0
    served_versions: dict[str, int] = Field(
        default_factory=dict, description="reviewed images by the served version that answered them"
    )
    unreadable_ledgers: list[str] = Field(default_factory=list, description="batches whose ledger did not parse")

    @classmethod
    def of(cls, lineage: FeedbackLineage) -> FeedbackRecord:
        return cls.model_validate(asdict(lineage))


class DataRecord(_Record):
    cache_key: str
    test_set: str = Field(description="The test set's identity: only versions measured on one set are compared")
    train_rows: int
    test_rows: int
    train_parts_sha256: list[str] = Field(default_factory=list, description="each training part's, in order")
    train_parquet_sha256: str | None = Field(None, description="the one training file's, before the cache kept parts")
    test_parquet_sha256: str
    sources: Sources
    train_rows_by_source: dict[str, int] = Field(default_factory=dict, description="canonical, then each batch")
    feedback: FeedbackRecord | None = Field(None, description="None: registered before lineage was recorded")


class CodeRecord(_Record):
    sha256: str
    git_commit: str | None = None


class Hardware(_Record):
    """The machine that trained (the flow that orchestrated may have run on another)."""

    device: str
    mixed_precision: bool
    platform: str | None = None
    machine: str | None = None
    cpus: int | None = None


class ValidationRecord(_Record):
    """The training rows held out for model selection: the test set is only ever used to evaluate."""

    fraction: float
    seed: int
    rows: int
    per_class: list[int]
    indices_sha256: str = Field(description="of the held-out row numbers (int64, sorted) in the training split")


class TrainingRecord(_Record):
    epochs: int
    seconds_per_epoch: float
    validation: ValidationRecord | None = None


class Metrics(_Record):
    test_accuracy: float
    test_loss: float
    train_accuracy: float
    train_loss: float
    train_test_gap: float


class ClassMetrics(_Record):
    name: str = Field(alias="class")
    precision: float
    recall: float
    f1: float
    support: int


class ParamsRecord(_Record):
    """The training parameters a version was made with, as recorded. `fmnist.training.model.TrainParams` checks
    what a run may be given; a record written by other code (a newer commit, an older one) may hold
    knobs or values this code does not know, and is read all the same, every field kept."""

    preset: str
    epochs: int
    batch_size: int
    learning_rate: float
    dropout: float
    seed: int
    weight_decay: float
    schedule: str

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """What a record leaves out is what its preset's parameters default to (as `TrainParams` fills them)."""
        from typing import get_args

        from fmnist.training.model import Preset, TrainParams

        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "dnn")
        defaults = TrainParams(preset=preset if preset in get_args(Preset) else "dnn")
        return {**defaults.model_dump(mode="json"), **data}


class RunManifest(_Record):
    """What a run records about the model it trained."""

    fingerprint: str = Field(description="Same data, code and parameters: same fingerprint")
    flow_run_id: str | None = None
    data: DataRecord
    params: ParamsRecord
    code: CodeRecord
    libraries: dict[str, str | None]
    hardware: Hardware
    training: TrainingRecord
    metrics: Metrics
    per_class: list[ClassMetrics]
    calibration: Calibration | None = Field(
        None, description="fitted on the test set for the label-free estimates; None: registered before they were"
    )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class VersionManifest(RunManifest):
    """A registered version's manifest: the run's, with its number, the gate's verdict and its files."""

    version: str
    registered_at: str
    gate: Decision
    files: dict[str, str] = Field(default_factory=dict, description="each file's sha256")

    @field_validator("files")
    @classmethod
    def _names_inside(cls, files: dict[str, str]) -> dict[str, str]:
        """Each name is read and written inside the version's folder (and an export's): never outside it."""
        for name in files:
            try:
                name_parts("the version's folder", name)
            except UnsafeName as exc:
                raise ValueError(str(exc)) from None
        return files

    @model_validator(mode="before")
    @classmethod
    def _early_gate(cls, data: Any) -> Any:
        """The first manifests called the verdict `decision`, with `promoted` for `passed`."""
        if isinstance(data, dict) and "gate" not in data and "decision" in data:
            old = data["decision"]
            data = {**data, "gate": {**old, "passed": old.get("promoted", False)}}
        return data


def fingerprint(cache_key: str, params: TrainParams) -> str:
    """Same data, same code, same parameters: same fingerprint, and no reason to train again."""
    return sha256_text("run", cache_key, lineage.code_sha256(), params.model_dump_json())


def test_set_id(test_images_sha256: str, test_labels_sha256: str) -> str:
    """Identity of the test set: only models measured on the same one are compared."""
    return sha256_text("test-set", test_images_sha256, test_labels_sha256)


def per_class_table(per_class: list[ClassMetrics]) -> str:
    """Markdown table of each class's precision, recall, F1 and support."""
    rows = [f"| {c.name} | {c.precision:.4f} | {c.recall:.4f} | {c.f1:.4f} | {c.support} |" for c in per_class]
    return "\n".join(["| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |", *rows])


def model_card(manifest: VersionManifest) -> str:
    """The version's card, from its final manifest (which holds its number and the gate's verdict)."""
    metrics, gate, params, data = manifest.metrics, manifest.gate, manifest.params, manifest.data
    weakest = sorted(manifest.per_class, key=lambda c: c.f1)[:3]
    code = manifest.code.git_commit or manifest.code.sha256[:12]
    canonical = data.train_rows_by_source.get("canonical", data.train_rows)
    batches = len(data.sources.incoming)
    sources = f"the canonical training set ({canonical:,} images)"
    if batches:
        added = data.train_rows - canonical
        sources += f" and {batches} incoming batch{'' if batches == 1 else 'es'} ({added:,} images)"
    if data.feedback and data.feedback.reviewed_batches:
        reviewed, names = data.feedback, data.feedback.reviewed_batches
        served = ", ".join(f"{v} ({n:,})" for v, n in sorted(reviewed.served_versions.items()))
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        sources += (
            f"; {reviewed.reviewed_images:,} of them reviewed feedback from the served versions {served}, in {listed}"
        )
    optimizer = f"{'AdamW' if params.weight_decay else 'Adam'} {params.learning_rate}"
    if params.schedule != "constant":
        optimizer += f" ({params.schedule} schedule)"
    selection = ""
    if held := manifest.training.validation:
        selection = (
            f"\n**Model selection**: on {held.rows:,} training images held out ({held.fraction:g} of each class, "
            f"seed {held.seed}); the test set is used only to evaluate.\n"
        )
    return f"""# Fashion-MNIST classifier {manifest.version}

**Model**: `{params.preset}` preset, {params.epochs} epochs at most ({manifest.training.epochs} run), batch \
{params.batch_size}, {optimizer}, dropout {params.dropout}, seed {params.seed}.
**Input**: 28x28 grayscale images scaled to [0, 1] (pixel / 255). **Output**: probabilities of the \
{len(CLASS_NAMES)} classes ({", ".join(CLASS_NAMES)}).

**Data**: {data.train_rows:,} training rows: {sources};
evaluated on the fixed canonical test set ({data.test_rows:,} images). Data key `{data.cache_key[:16]}`.
{selection}
**Metrics**: test accuracy {metrics.test_accuracy:.4f}, test loss {metrics.test_loss:.4f}, train-test gap
{metrics.train_test_gap:+.4f}.

{per_class_table(manifest.per_class)}

**Promotion gate**: {"passed" if gate.passed else "not passed"}: {gate.reason}.

**Trained on**: {manifest.hardware.device}; code {code};
TensorFlow {manifest.libraries.get("tensorflow")}, Keras {manifest.libraries.get("keras")}.

**Limits**: trained on centred, 28x28 product photos on a plain background; other images (photos of
worn clothes, other framings) are out of distribution. Its weakest classes on the test set (lowest F1):
{", ".join(f"{c.name} ({c.f1:.3f})" for c in weakest)}.
"""


def build_manifest(
    *,
    raw: RawDataset,
    cached: CachedDataset,
    params: TrainParams,
    trained: TrainResult,
    evaluation: Evaluation,
    flow_run_id: str | None,
    feedback: FeedbackLineage | None = None,
) -> RunManifest:
    """What the run records about the model it trained and evaluated."""
    return RunManifest(
        fingerprint=fingerprint(cached.key, params),
        flow_run_id=flow_run_id,
        data=DataRecord(
            cache_key=cached.key,
            test_set=test_set_id(raw.test_images.sha256, raw.test_labels.sha256),
            train_rows=cached.train_rows,
            test_rows=cached.test.rows,
            train_parts_sha256=[part.sha256 for part in cached.train],
            test_parquet_sha256=cached.test.sha256,
            sources=Sources.model_validate(cached.sources),
            train_rows_by_source=cached.rows_by_source,
            feedback=FeedbackRecord.of(feedback) if feedback else None,
        ),
        params=ParamsRecord.model_validate(params.model_dump(mode="json")),
        code=CodeRecord(sha256=lineage.code_sha256(), git_commit=lineage.git_commit()),
        # Of the machine that trained: the orchestrating flow may run on another host.
        libraries=trained.libraries,
        hardware=Hardware(**trained.host, device=trained.device, mixed_precision=trained.mixed_precision),
        training=TrainingRecord(
            epochs=trained.epochs,
            seconds_per_epoch=trained.seconds_per_epoch,
            validation=ValidationRecord(**asdict(trained.validation)) if trained.validation else None,
        ),
        metrics=Metrics(**{k: getattr(evaluation, k) for k in Metrics.model_fields}),
        per_class=[ClassMetrics.model_validate(c) for c in evaluation.per_class],
        calibration=evaluation.calibration,
    )
