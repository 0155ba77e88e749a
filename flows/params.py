"""The retraining flow's parameters: what to train, as one typed object (a form in the Prefect UI).

Where things are kept (`fmnist.storage.layout.StorageParams`) is the flow's second parameter: a deployment
sets it once, and an operator's `--param params='{...}'` replaces only this object, never the storage.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fmnist.data.dataset import DEFAULT_MIRRORS, FASHION_MNIST, DatasetSpec
from fmnist.data.download import check_mirror
from fmnist.data.drift import DriftSetting
from fmnist.data.incoming import BadBatches
from fmnist.registry.gate import PromotionParams
from fmnist.registry.retention import RetentionParams
from fmnist.training.model import TrainParams


class RetrainParams(BaseModel):
    # A misspelt or misplaced field (e.g. `data_root`, which belongs to `storage`) is an error, not ignored.
    # hide_input_in_errors: a mirror URL with credentials in it is refused without echoing them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)

    mirrors: list[str] = Field(
        default_factory=lambda: list(DEFAULT_MIRRORS),
        min_length=1,
        description="Tried in order: local paths, file://, http(s):// or s3:// folders holding the .gz files",
    )
    download_timeout_s: float = Field(30.0, gt=0, le=600, description="Per network read")
    download_deadline_s: float = Field(
        900.0, gt=0, le=7200, description="Per file and mirror: a mirror still sending after this is skipped"
    )
    download_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of the whole download, 10 s, 20 s, ... apart, when a mirror failed in a way that "
        "may pass (time-out, dropped connection, HTTP 429/5xx); never after a checksum mismatch",
    )
    dataset: DatasetSpec = Field(FASHION_MNIST, description="The files to fetch, pinned by sha256")
    training: TrainParams = Field(default_factory=TrainParams, description="The model and how to train it")
    promotion: PromotionParams = Field(
        default_factory=PromotionParams, description="The gate: an accuracy floor, and a margin over the champion"
    )
    force_retrain: bool = Field(False, description="Train even if the champion was made from the same data and code")
    drift: DriftSetting = Field(
        "warn",
        description="Incoming batches unlike the training data: warn (and train on them), fail (stop), off (no check)",
    )
    training_silence_timeout_s: float = Field(
        1800,
        ge=60,
        le=7 * 24 * 3600,
        description="Fail when the training run shows no heartbeat or state change for this long "
        "(a lost GPU host, or no GPU worker to take the run)",
    )
    bad_batches: BadBatches = Field(
        "fail",
        description="An incoming batch that cannot be used (unreadable, test-set images, broken contract): "
        "fail the run, or quarantine it (move it to <data_root>/quarantine/ with its error) and train on the rest",
    )
    retention: RetentionParams = Field(default_factory=RetentionParams, description="Run folders kept under runs/")

    @field_validator("mirrors")
    @classmethod
    def _usable_mirrors(cls, mirrors: list[str]) -> list[str]:
        for mirror in mirrors:
            check_mirror(mirror)  # before a run starts: no unknown scheme, no credentials to leak
        return mirrors
