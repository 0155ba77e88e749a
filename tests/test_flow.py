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
from tests.helpers import synthetic_images, write_idx_batch


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


def artifacts_of(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: str(a.data) for a in found}


def test_flow_runs_the_data_stages_as_tasks(mirror, tmp_path: Path) -> None:
    folder, spec = mirror
    params = RetrainParams(data_root=str(tmp_path / "data"), mirrors=[str(folder)], dataset=spec)
    state = retrain(params, return_state=True)
    assert state.is_completed()
    cached = state.result()
    assert (cached.train.rows, cached.test.rows) == (200, 50)
    assert Path(cached.train.path).is_relative_to(tmp_path / "data" / "cache")
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert set(artifacts) == {"fashion-mnist-download", "data-validation", "data-cache"}
    assert "Data validation passed" in artifacts["data-validation"]
    assert cached.key in artifacts["data-cache"]


def test_bad_incoming_batch_stops_the_flow_at_validation(mirror, tmp_path: Path) -> None:
    folder, spec = mirror
    labels = np.array([0, 10], dtype=np.uint8)
    write_idx_batch(tmp_path / "data" / "incoming" / "bad-labels", synthetic_images(labels % 10, seed=1), labels)
    params = RetrainParams(data_root=str(tmp_path / "data"), mirrors=[str(folder)], dataset=spec)
    state = retrain(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"raw-incoming-bad-labels: expect_column_values_to_be_between\(column=label"):
        state.result()
    assert not (tmp_path / "data" / "cache").exists()
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert "Data validation **FAILED**" in artifacts["data-validation"]
    assert "data-cache" not in artifacts


def test_parameters_are_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="download_retries"):
        RetrainParams(download_retries=-1)
    with pytest.raises(ValueError, match="mirrors"):
        RetrainParams(mirrors=[])
