"""The retraining flow's parameters: one typed object, rendered as a form in the Prefect UI."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from fmnist.dataset import DEFAULT_MIRRORS, FASHION_MNIST, DataLayout, DatasetSpec
from fmnist.model import TrainParams


class PromotionParams(BaseModel):
    """The gate a new version must pass to become champion."""

    min_accuracy: float = Field(0.80, ge=0, le=1, description="Absolute floor on test accuracy (chance is 0.10)")
    tolerance: float = Field(0.005, ge=0, le=1, description="How far below the champion a new version may be")
    force: bool = Field(False, description="Promote whatever the metrics say (an operator's decision)")


class RetrainParams(BaseModel):
    data_root: str = Field(
        "data", description="Raw files, validation results and the parquet cache; shared by all hosts of a run"
    )
    incoming_dir: str | None = Field(
        None, description="Labeled batches that join the training set; default <data_root>/incoming"
    )
    mirrors: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MIRRORS),
        min_length=1,
        description="Tried in order: local paths, file:// or http(s):// folders holding the .gz files",
    )
    download_timeout_s: float = Field(30.0, gt=0, le=600, description="Per network read")
    download_retries: int = Field(2, ge=0, le=10, description="Retries per mirror on network errors")
    dataset: DatasetSpec = Field(FASHION_MNIST, description="The files to fetch, pinned by sha256")
    training: TrainParams = Field(default_factory=TrainParams, description="The model and how to train it")
    registry_root: str = Field("artifacts", description="Model registry; each run's files go under <root>/runs/")
    promotion: PromotionParams = Field(default_factory=PromotionParams)
    force_retrain: bool = Field(False, description="Train even if the champion was made from the same data and code")

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_root).resolve())

    @property
    def registry_path(self) -> Path:
        return Path(self.registry_root).resolve()

    def run_dir(self, run_id: str) -> Path:
        return self.registry_path / "runs" / run_id

    @property
    def incoming_path(self) -> Path:
        return Path(self.incoming_dir) if self.incoming_dir else self.layout.root / "incoming"
