"""The flow under a real (test-harness) Prefect server, on small generated data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness

from flows.params import RetrainParams
from flows.retrain import retrain
from fmnist.model import TrainParams
from tests.helpers import synthetic_images, write_idx_batch, write_mirror


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def learnable_mirror(tmp_path_factory: pytest.TempPathFactory):
    """Enough generated images for one epoch to learn well above chance."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, write_mirror(folder, train_per_class=50, test_per_class=10)


def params_for(mirror, tmp_path: Path) -> RetrainParams:
    folder, spec = mirror
    return RetrainParams(
        data_root=str(tmp_path / "data"),
        registry_root=str(tmp_path / "artifacts"),
        mirrors=[str(folder)],
        dataset=spec,
        training=TrainParams(epochs=1),
    )


def artifacts_of(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: str(a.data) for a in found}


def test_flow_runs_every_stage_as_a_task(learnable_mirror, tmp_path: Path) -> None:
    state = retrain(params_for(learnable_mirror, tmp_path), return_state=True)
    assert state.is_completed()
    outcome = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert outcome.test_accuracy > 0.5
    assert Path(outcome.run_dir) == tmp_path / "artifacts" / "runs" / str(flow_run_id)
    assert Path(outcome.model_path).is_file()
    assert (Path(outcome.run_dir) / "evaluation" / "confusion_matrix.png").is_file()
    artifacts = artifacts_of(flow_run_id)
    assert set(artifacts) == {
        "fashion-mnist-download",
        "data-validation",
        "data-cache",
        "training-progress",
        "per-class-metrics",
        "confusion-matrix",
        "evaluation-report",
    }
    assert "Data validation passed" in artifacts["data-validation"]
    assert outcome.data_key in artifacts["data-cache"]
    assert float(artifacts["training-progress"]) == 100.0
    assert "data:image/png;base64," in artifacts["evaluation-report"]


def test_bad_incoming_batch_stops_the_flow_at_validation(learnable_mirror, tmp_path: Path) -> None:
    labels = np.array([0, 10], dtype=np.uint8)
    write_idx_batch(tmp_path / "data" / "incoming" / "bad-labels", synthetic_images(labels % 10, seed=1), labels)
    state = retrain(params_for(learnable_mirror, tmp_path), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"raw-incoming-bad-labels: expect_column_values_to_be_between\(column=label"):
        state.result()
    assert not (tmp_path / "data" / "cache").exists()
    assert not (tmp_path / "artifacts").exists()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert "Data validation **FAILED**" in artifacts["data-validation"]
    assert "data-cache" not in artifacts


def test_parameters_are_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="download_retries"):
        RetrainParams(download_retries=-1)
    with pytest.raises(ValueError, match="mirrors"):
        RetrainParams(mirrors=[])
