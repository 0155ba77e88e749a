"""Where a run keeps things: its storage parameters, and the locations under its data root.

Every root is a local path or an `s3://bucket/prefix` URL. Locations are strings; `fmnist.storage`
reads and writes them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fmnist.storage import StorageError, Store, default_scratch_dir, join, normalize


class StorageParams(BaseModel):
    """Where the pipeline keeps its data, models and runs: set per deployment, the same on every host."""

    # hide_input_in_errors: a URL with credentials in it is refused without echoing them.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True, allow_inf_nan=False)

    data_root: str = Field(
        "data", description="Raw files, validation results and the parquet cache: a local path or s3://bucket/prefix"
    )
    registry_root: str = Field(
        "artifacts", description="The model registry and each run's folder (<root>/runs/): a path or s3:// URL"
    )
    incoming_dir: str | None = Field(
        None, description="Labeled batches that join the training set; default <data_root>/incoming"
    )
    scratch_dir: str | None = Field(
        None,
        description="A local folder on each host for verified copies of s3:// files (reused across runs); "
        "default ~/.cache/fashion-mnist-pipeline",
    )
    timeout_s: float = Field(30.0, gt=0, le=600, description="Per object-store request (connect, and each read)")

    @field_validator("data_root", "registry_root", "incoming_dir")
    @classmethod
    def _supported(cls, location: str | None) -> str | None:
        if location is not None:
            try:
                normalize(location)  # refuses unknown schemes and credentials in URLs, before any run starts
            except StorageError as exc:
                raise ValueError(str(exc)) from None
        return location

    @model_validator(mode="after")
    def _disjoint(self) -> StorageParams:
        """No root inside another: with an incoming folder that holds the registry, quarantine moved the
        champion pointer and then the versions away, and the next run issued v0001 again."""
        areas = self.areas()
        for i, (name, location) in enumerate(areas):
            for other, other_location in areas[i + 1 :]:
                if (name, other) in _NESTED or not _overlap(location, other_location):
                    continue
                how = "is" if location == other_location else "overlaps"
                raise ValueError(
                    f"{name} ({location}) {how} {other} ({other_location}): each must be a folder of its own, "
                    "neither inside the other"
                )
        return self

    def areas(self) -> list[tuple[str, str]]:
        """Every folder the pipeline writes in, named as a user sets it: these must not overlap."""
        data = self.data
        return [
            ("data_root", data.root),
            ("<data_root>/raw", data.raw),
            ("<data_root>/validation", data.validation),
            ("<data_root>/cache", data.cache),
            ("incoming_dir", self.incoming),
            ("<data_root>/quarantine", self.quarantine),
            ("registry_root", self.registry),
            ("scratch_dir", str(self.scratch_path())),
        ]

    def scratch_path(self) -> Path:
        return scratch_path(self.scratch_dir)

    def store(self) -> Store:
        return Store(scratch=self.scratch_path(), timeout_s=self.timeout_s)

    @property
    def data(self) -> DataLayout:
        return DataLayout(normalize(self.data_root))

    @property
    def registry(self) -> str:
        return normalize(self.registry_root)

    @property
    def incoming(self) -> str:
        return normalize(self.incoming_dir) if self.incoming_dir else join(self.data.root, "incoming")

    @property
    def quarantine(self) -> str:
        """Where refused incoming batches are moved (with `bad_batches="quarantine"`), each with its error."""
        return join(self.data.root, "quarantine")

    @property
    def runs(self) -> str:
        return runs_root(self.registry)

    def run_layout(self, run_id: str | None) -> RunLayout:
        """The folder of the run `run_id` (a flow run's id, so a retried run finds its own training backup)."""
        return RunLayout(join(self.runs, run_id or uuid.uuid4().hex))


def runs_root(registry_root: str) -> str:
    """Where each run's folder is: `<registry_root>/runs/`."""
    return join(registry_root, "runs")


def scratch_path(scratch_dir: str | None) -> Path:
    """The host's scratch folder: `scratch_dir`, or the default one."""
    return (Path(scratch_dir).expanduser() if scratch_dir else default_scratch_dir()).resolve()


# The folders that live inside the data root by design (the data root first in `areas`).
_NESTED = {
    ("data_root", name) for name in ("<data_root>/raw", "<data_root>/validation", "<data_root>/cache", "incoming_dir")
} | {("data_root", "<data_root>/quarantine")}


def _overlap(a: str, b: str) -> bool:
    """Whether one location is the other or inside it (by whole path parts, on disk and in a bucket)."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


OUTCOMES_FOLDER = "sources"  # in the validation folder


@dataclass(frozen=True)
class DataLayout:
    """Where each data stage keeps its files under one data root (shared by every host of a run)."""

    root: str

    @property
    def raw(self) -> str:
        return join(self.root, "raw")

    @property
    def validation(self) -> str:
        return join(self.root, "validation")

    @property
    def cache(self) -> str:
        return join(self.root, "cache")

    @property
    def feedback(self) -> str:
        """What the server captured for review (`fmnist.serving.capture`), and the reviews' records."""
        return join(self.root, "feedback")

    @property
    def screened(self) -> str:
        """Receipts of the incoming batches that passed screening (`fmnist.data.incoming.screen_incoming`)."""
        return join(self.validation, "screened")

    @property
    def outcomes(self) -> str:
        """Each source's kept validation outcomes (`fmnist.data.contract.kept_outcomes`)."""
        return join(self.validation, OUTCOMES_FOLDER)


@dataclass(frozen=True)
class RunLayout:
    """One run's folder in the registry's store, `<registry_root>/runs/<run id>/`, and what the stages
    write in it (`fmnist.training.run_folder` reads and writes it, and resumes a run from it on any host):

        history.json            per-epoch metrics, kept across resumes
        model.keras             the trained model
        train_result.json       what training hands back to the retraining flow (which may run elsewhere)
        tensorboard/            TensorBoard logs
        evaluation/             metrics.json, the plots and test_predictions.npy (each test image's class)
        saved_model/1/          the TensorFlow SavedModel (fmnist.training.export), checked against the Keras model
        backup/                 Keras BackupAndRestore state while training runs
    """

    location: str
    HISTORY: ClassVar[str] = "history.json"
    MODEL: ClassVar[str] = "model.keras"
    TRAIN_RESULT: ClassVar[str] = "train_result.json"
    TENSORBOARD: ClassVar[str] = "tensorboard"
    EVALUATION: ClassVar[str] = "evaluation"
    METRICS: ClassVar[str] = "metrics.json"  # in evaluation/
    # In evaluation/, and registered under this name: the argmax class of each test image (uint8, in the test
    # set's order), so that the rollout's judge can compute how often any two versions agree.
    TEST_PREDICTIONS: ClassVar[str] = "test_predictions.npy"
    SAVED_MODEL: ClassVar[str] = "saved_model"
    BACKUP: ClassVar[str] = "backup"

    def file(self, *parts: str) -> str:
        """The location of a file of this run in the store."""
        return join(self.location, *parts)
