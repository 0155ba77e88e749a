"""The retraining flow in one process under a real (test-harness) Prefect server, on small data."""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.client.schemas.objects import StateType
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectNotFound
from prefect.logging.handlers import APILogWorker
from prefect.testing import utilities as prefect_testing
from prefect.testing.utilities import prefect_test_harness

from flows.params import RetrainParams
from flows.retrain import retrain
from fmnist.data import idx
from fmnist.data.dataset import CLASS_NAMES
from fmnist.data.validation import DriftError
from fmnist.ops import cli
from fmnist.registry.gate import PromotionParams
from fmnist.registry.predictions import read_test_predictions
from fmnist.registry.retention import RetentionParams
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from fmnist.storage.files import sha256_file
from fmnist.storage.layout import StorageParams
from fmnist.training.model import TrainParams
from tasks.download import download_with_retries
from tests.helpers import synthetic_images, write_idx_batch, write_mirror
from tests.seaweedfs import SECRET_KEY

pytestmark = pytest.mark.training


HARNESS_DRAIN_S = 30  # how long the harness may drain its log and event workers before it stops its server
RECORD_WAIT_S = 60  # how long a read waits for what a run sent behind it to be recorded


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    """Prefect's test harness. Its exit drains its log and event workers before it stops its server, and
    that drain once waited for good (twice in five runs of the suite: the worker hung in teardown until
    the suite was killed); bounded here, so such a drain costs HARNESS_DRAIN_S and the server still stops."""
    with pytest.MonkeyPatch.context() as patch, prefect_test_harness(server_startup_timeout=120):
        yield
        patch.setattr(prefect_testing, "run_coro_as_sync", bounded_drain(prefect_testing.run_coro_as_sync))


def bounded_drain(run_coro_as_sync):
    def run(coro, *args, **kwargs):
        async def within():
            try:
                return await asyncio.wait_for(coro, HARNESS_DRAIN_S)
            except TimeoutError:
                warnings.warn(
                    f"Prefect's test harness had not drained its workers in {HARNESS_DRAIN_S} s", stacklevel=1
                )

        return run_coro_as_sync(within(), *args, **kwargs)

    return run


@pytest.fixture(scope="module")
def learnable_mirror(tmp_path_factory: pytest.TempPathFactory):
    """Enough generated images for one epoch to learn well above chance."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, write_mirror(folder, train_per_class=50, test_per_class=10)


def params_for(mirror, **overrides) -> RetrainParams:
    folder, spec = mirror
    defaults = {"training": TrainParams(epochs=1), "promotion": PromotionParams(min_accuracy=0.5)}
    return RetrainParams(mirrors=[str(folder)], dataset=spec, **{**defaults, **overrides})


def local_storage(root: Path) -> StorageParams:
    return StorageParams(data_root=str(root / "data"), registry_root=str(root / "artifacts"))


def artifacts_of(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: str(a.data) for a in found}


def sent_behind() -> None:
    """Task-run states and logs reach the server behind a run, from this process's event and log workers (once 469
    items were still queued when a run ended on a busy machine): wait until both have sent everything."""
    EventsWorker.drain_all(timeout=RECORD_WAIT_S)
    APILogWorker.drain_all(timeout=RECORD_WAIT_S)


def task_runs_of(flow_run_id) -> list[str]:
    """The stage names of a flow run's own task runs, in the order they started (`validate-3af` -> `validate`), once
    the server has recorded them all: every one ended, and none added for a second."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    sent_behind()
    deadline = time.monotonic() + RECORD_WAIT_S
    seen = None
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            )
            runs = [run for run in runs if run.flow_run_id == flow_run_id]
            now = [(run.id, run.state_type) for run in runs]
            if now == seen and all(run.state and run.state.is_final() for run in runs):
                return [run.name.rsplit("-", 1)[0] for run in runs]
            assert time.monotonic() < deadline, f"task runs still being recorded after {RECORD_WAIT_S} s: {now}"
            seen = now
            time.sleep(1)


def recorded_state(client, task_run_id) -> StateType | None:
    """A task run's state as the server has it; None before its first event is recorded."""
    try:
        return client.read_task_run(task_run_id).state_type
    except ObjectNotFound:
        return None


def logs_of(flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    sent_behind()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def training_progress_of(run_dir: str) -> str:
    """The progress artifact of the training flow run that wrote into `run_dir` (a subflow)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-progress"])))
        for artifact in found:
            run = client.read_flow_run(artifact.flow_run_id)
            if run.parameters.get("run", {}).get("location") == run_dir:
                assert run.parent_task_run_id is not None  # ran as a subflow of the retraining run
                return str(artifact.data)
    raise AssertionError(f"no training-progress artifact for {run_dir}")


def test_first_run_registers_a_champion_and_a_rerun_retrains_nothing(learnable_mirror, tmp_path: Path) -> None:
    state = retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True)
    assert state.is_completed()
    outcome = state.result()
    flow_run_id = state.state_details.flow_run_id
    assert (outcome.version, outcome.promoted, outcome.champion) == ("v0001", True, "v0001")
    # Every stage is a task run of its own in the UI's graph (normalize once ran inside the flow run).
    assert task_runs_of(flow_run_id) == [
        "download",
        "collect-incoming",
        "validate",
        "normalize",
        "check-registered",
        "train-fashion-mnist",  # the training flow, a subflow here (a deployment run on the GPU pool)
        "evaluate",
        "register",
        "prune-runs",
    ]
    assert Path(outcome.run_dir) == tmp_path / "artifacts" / "runs" / str(flow_run_id)
    registry = Registry(Store(), str(tmp_path / "artifacts"))
    version = registry.manifest("v0001")
    assert version.flow_run_id == str(flow_run_id) and version.data.cache_key == outcome.data_key
    assert {"model.keras", "model_card.md", "metrics.json", "history.json", "confusion_matrix.png"} <= set(
        version.files
    )
    # What the rollout's judge reads of it: the calibration, and each test image's class.
    assert version.calibration is not None and version.calibration.images == version.data.test_rows
    assert len(read_test_predictions(registry, "v0001")) == version.data.test_rows
    assert version.data.train_rows_by_source == {"canonical": 500}  # the mirror's spec: 50 images a class
    card = (Path(registry.version_dir("v0001")) / "model_card.md").read_text()
    weakest = min(version.per_class, key=lambda c: c.f1)
    assert f"(lowest F1):\n{weakest.name} ({weakest.f1:.3f})" in card
    assert "500 training rows: the canonical training set (500 images);" in card
    assert f"the 10 classes ({', '.join(CLASS_NAMES)})" in card
    # Its SavedModel is part of the version, hashed; `export` hands TF Serving a verified copy as version 1.
    exported = {
        name.removeprefix("saved_model/1/"): sha for name, sha in version.files.items() if "saved_model" in name
    }
    assert "saved_model.pb" in exported and "variables/variables.index" in exported
    assert cli.main(["--registry", registry.root, "export", "champion", "--out", str(tmp_path / "models")]) == 0
    copied = tmp_path / "models" / "1"
    assert {str(p.relative_to(copied)): sha256_file(p) for p in copied.rglob("*") if p.is_file()} == exported
    artifacts = artifacts_of(flow_run_id)
    assert set(artifacts) == {
        "fashion-mnist-download",
        "data-validation",
        "data-cache",
        "per-class-metrics",
        "confusion-matrix",
        "evaluation-report",
        "retrain-report",
    }
    assert float(training_progress_of(outcome.run_dir)) == 100.0
    assert "# v0001 promoted to champion" in artifacts["retrain-report"]
    assert "first version to clear the floor" in artifacts["retrain-report"]
    assert "data:image/png;base64," in artifacts["evaluation-report"]

    again = retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True)
    assert again.result().version is None and again.result().champion == "v0001"
    assert registry.versions() == ["v0001"]
    assert "Champion v0001 is current" in artifacts_of(again.state_details.flow_run_id)["retrain-report"]

    forced = retrain(params_for(learnable_mirror, force_retrain=True), local_storage(tmp_path), return_state=True)
    assert forced.result().version == "v0002" and registry.versions() == ["v0001", "v0002"]


def files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_bad_incoming_batch_fails_the_run_and_changes_nothing(learnable_mirror, tmp_path: Path) -> None:
    assert retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True).is_completed()
    registry_files, cache_files = files_under(tmp_path / "artifacts"), files_under(tmp_path / "data" / "cache")
    labels = np.array([0, 10], dtype=np.uint8)
    write_idx_batch(tmp_path / "data" / "incoming" / "bad-labels", synthetic_images(labels % 10, seed=11), labels)
    state = retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"raw-incoming-bad-labels: expect_column_values_to_be_between\(column=label"):
        state.result()
    assert files_under(tmp_path / "artifacts") == registry_files  # the champion and every version as they were
    assert files_under(tmp_path / "data" / "cache") == cache_files
    assert (tmp_path / "data" / "incoming" / "bad-labels").is_dir()  # fail mode moves nothing
    artifacts = artifacts_of(state.state_details.flow_run_id)
    assert "refused: the run stops" in artifacts["incoming-batches"]
    assert "evaluation-report" not in artifacts and "retrain-report" not in artifacts


def test_quarantine_moves_bad_batches_aside_and_trains_on_the_rest(learnable_mirror, tmp_path: Path) -> None:
    folder, _ = learnable_mirror
    incoming = tmp_path / "data" / "incoming"
    labels = np.array([0, 10], dtype=np.uint8)
    write_idx_batch(incoming / "bad-labels", synthetic_images(labels % 10, seed=11), labels)
    test_images = idx.read_images(Path(folder) / "t10k-images-idx3-ubyte.gz")
    write_idx_batch(incoming / "test-copies", test_images[:5], np.arange(5, dtype=np.uint8))
    good_labels = np.arange(10, dtype=np.uint8)
    write_idx_batch(incoming / "good", synthetic_images(good_labels, seed=7), good_labels)

    state = retrain(params_for(learnable_mirror, bad_batches="quarantine"), local_storage(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    registry = Registry(Store(), str(tmp_path / "artifacts"))
    assert list(registry.manifest(state.result().version).data.sources.incoming) == ["good"]
    assert sorted(p.name for p in incoming.iterdir()) == ["good"]
    moved = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "data" / "quarantine").iterdir()}
    assert sorted(moved) == ["bad-labels", "test-copies"]
    assert "expect_column_values_to_be_between(column=label" in (moved["bad-labels"] / "QUARANTINED.txt").read_text()
    note = (moved["test-copies"] / "QUARANTINED.txt").read_text()
    assert "5 of its 5 images are copies of test-set images (its image 0 is test image 0)" in note
    assert (moved["test-copies"] / "batch-labels-idx1-ubyte.gz").is_file()  # moved whole, not deleted
    assert "quarantined: moved to" in artifacts_of(state.state_details.flow_run_id)["incoming-batches"]


def test_a_version_kept_back_is_not_trained_again_every_night(learnable_mirror, tmp_path: Path) -> None:
    """Only the champion's fingerprint used to count: a candidate kept back was retrained every night."""
    assert retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True).result().promoted
    # Another test set: the gate keeps the candidate back as not comparable with the champion.
    other = write_mirror(tmp_path / "other-mirror", train_per_class=50, test_per_class=10, seed=5)
    other_test_set = params_for((tmp_path / "other-mirror", other))
    kept_back = retrain(other_test_set, local_storage(tmp_path), return_state=True).result()
    assert (kept_back.version, kept_back.promoted) == ("v0002", False)
    again = retrain(other_test_set, local_storage(tmp_path), return_state=True)
    assert again.result().version is None and again.result().champion == "v0001"
    assert Registry(Store(), str(tmp_path / "artifacts")).versions() == ["v0001", "v0002"]
    report = artifacts_of(again.state_details.flow_run_id)["retrain-report"]
    assert "v0002 was trained from the same data, code and parameters and was kept back (champion v0001 was" in report


def test_the_whole_flow_on_object_storage(learnable_mirror, bucket: str, tmp_path: Path) -> None:
    """Data root, incoming folder and registry in a bucket; this host keeps only verified scratch copies."""
    storage = StorageParams(
        data_root=f"{bucket}/data", registry_root=f"{bucket}/registry", scratch_dir=str(tmp_path / "scratch")
    )
    state = retrain(params_for(learnable_mirror), storage, return_state=True)
    assert state.is_completed(), state.message
    outcome = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert (outcome.version, outcome.champion) == ("v0001", "v0001")
    assert outcome.run_dir == f"{bucket}/registry/runs/{flow_run_id}"
    assert outcome.version_dir == f"{bucket}/registry/versions/v0001"
    store = Store(scratch=tmp_path / "another-host")
    registry = Registry(store, f"{bucket}/registry")
    assert registry.versions() == ["v0001"] and registry.damaged_files("v0001") == []
    assert {"model.keras", "model_card.md", "history.json", "metrics.json"} <= set(registry.manifest("v0001").files)
    assert store.find(f"{bucket}/data/raw") == sorted(r.raw_name for r in learnable_mirror[1].files)
    # Nothing of the credentials anywhere: not in the bucket, the artifacts or the logs.
    everything = b"".join(store.read_bytes(f"{bucket}/{name}") for name in store.find(bucket))
    assert SECRET_KEY.encode() not in everything
    assert SECRET_KEY not in "".join(artifacts_of(flow_run_id).values()) + logs_of(flow_run_id)

    again = retrain(params_for(learnable_mirror), storage, return_state=True)
    assert again.result().version is None and again.result().champion == "v0001"


def test_parameters_are_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="download_retries"):
        RetrainParams(download_retries=-1)
    with pytest.raises(ValueError, match="mirrors"):
        RetrainParams(mirrors=[])
    with pytest.raises(ValueError, match="min_accuracy"):
        RetrainParams(promotion={"min_accuracy": 2})
    with pytest.raises(ValueError, match="data_root"):
        RetrainParams(data_root="s3://bucket/data")  # where things live is `storage`, not `params`
    with pytest.raises(ValueError, match="unsupported scheme 'gs'"):
        StorageParams(data_root="gs://bucket/data")
    with pytest.raises(ValueError, match="credentials do not belong in a storage URL") as refused:
        StorageParams(registry_root="s3://AKIAEXAMPLE:s3cr3t@bucket/registry")
    assert "s3cr3t" not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)


def test_drifted_batch_warns_by_default_and_stops_the_run_when_told(learnable_mirror, tmp_path: Path) -> None:
    labels = np.full(100, 3, dtype=np.uint8)  # one class only
    write_idx_batch(tmp_path / "data" / "incoming" / "dresses-only", synthetic_images(labels, seed=4), labels)
    stopped = retrain(params_for(learnable_mirror, drift="fail"), local_storage(tmp_path), return_state=True)
    assert stopped.is_failed()
    with pytest.raises(DriftError, match=r"dresses-only.*column=label, threshold=0.5\): observed 2.30"):
        stopped.result()
    assert Registry(Store(), str(tmp_path / "artifacts")).versions() == []

    warned = retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True)
    assert warned.is_completed() and warned.result().version == "v0001"
    report = artifacts_of(warned.state_details.flow_run_id)["data-validation"]
    assert "## Drift (a warning: drift=warn)" in report and "drift-incoming-dresses-only" in report
    assert "Incoming data unlike the training data: batch dresses-only" in logs_of(warned.state_details.flow_run_id)


def test_old_run_folders_are_pruned_but_not_a_versions_or_this_runs(learnable_mirror, tmp_path: Path) -> None:
    first = retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True).result()
    runs = tmp_path / "artifacts" / "runs"
    month_ago = time.time() - 30 * 86400
    for name in ("abandoned-1", "abandoned-2"):
        (runs / name).mkdir()
        (runs / name / "history.json").write_text("{}")
    for path in runs.rglob("*"):
        os.utime(path, (month_ago, month_ago))
    retention = RetentionParams(keep_last=1, keep_days=7)
    second = retrain(
        params_for(learnable_mirror, force_retrain=True, retention=retention),
        local_storage(tmp_path),
        return_state=True,
    ).result()
    assert second.version == "v0002"
    assert sorted(p.name for p in runs.iterdir()) == sorted([Path(first.run_dir).name, Path(second.run_dir).name])


def test_the_download_task_retries_only_what_may_pass(learnable_mirror, tmp_path: Path) -> None:
    """One retry layer: mirrors fall through at once; Prefect retries the task, and only on transient errors."""
    _, spec = learnable_mirror

    @flow
    def download_from(mirrors: list[str]) -> tuple[bool, object]:
        state = download_with_retries(2, backoff_s=0)(
            spec=spec, mirrors=mirrors, storage=local_storage(tmp_path), timeout_s=1, deadline_s=30, return_state=True
        )
        return state.is_failed(), state.state_details.task_run_id

    def attempts(mirrors: list[str]) -> int:
        failed, task_run_id = download_from(mirrors)
        assert failed
        # Task run states reach the server through its event stream: wait until the last one has.
        sent_behind()
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + RECORD_WAIT_S
            while (state_type := recorded_state(client, task_run_id)) != StateType.FAILED:
                assert time.monotonic() < deadline, f"task run still {state_type} after {RECORD_WAIT_S} s"
                time.sleep(0.5)
            return client.read_task_run(task_run_id).run_count

    assert attempts(["http://127.0.0.1:9/"]) == 3  # connection refused: may pass, so two retries
    assert attempts([str(tmp_path / "no-such-mirror")]) == 1  # a missing file will not appear after a pause


def test_a_png_batch_joins_the_training_data(learnable_mirror, tmp_path: Path) -> None:
    bag = tmp_path / "data" / "incoming" / "photos" / "Ankle_Boot"
    bag.mkdir(parents=True)
    images = synthetic_images(np.full(6, 9, dtype=np.uint8), seed=44)
    for i, image in enumerate(images):
        Image.fromarray(image).save(bag / f"{i}.PNG")
    state = retrain(params_for(learnable_mirror), local_storage(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    data = Registry(Store(), str(tmp_path / "artifacts")).manifest(state.result().version).data
    assert list(data.sources.incoming) == ["photos"] and data.train_rows == 500 + 6
    assert data.train_rows_by_source == {"canonical": 500, "photos": 6}
    [row] = json.loads(artifacts_of(state.state_details.flow_run_id)["incoming-batches"])
    assert (row["batch"], row["kind"], row["rows"], row["status"]) == ("photos", "png", 6, "used")


def test_the_canary_policy_makes_a_passing_version_the_canary(learnable_mirror, tmp_path: Path) -> None:
    """The nightly deployments' policy, through the flow: the first version is promoted, the next one that
    passes is served as the canary and left to the judge, and a rerun retrains nothing."""
    canary = PromotionParams(min_accuracy=0.5, tolerance=1.0, rollout="canary")
    first = retrain(params_for(learnable_mirror, promotion=canary), local_storage(tmp_path), return_state=True)
    assert (first.result().version, first.result().promoted) == ("v0001", True)
    second = retrain(
        params_for(learnable_mirror, promotion=canary, force_retrain=True), local_storage(tmp_path), return_state=True
    )
    outcome = second.result()
    assert (outcome.version, outcome.promoted, outcome.canary, outcome.champion) == ("v0002", False, True, "v0001")
    report = artifacts_of(second.state_details.flow_run_id)["retrain-report"]
    assert "# v0002 registered as the canary (its rollout has started)" in report
    registry = Registry(Store(), str(tmp_path / "artifacts"))
    assert Rollouts(registry).active().version == "v0002" and registry.champion() == "v0001"
    again = retrain(params_for(learnable_mirror, promotion=canary), local_storage(tmp_path), return_state=True)
    assert again.result().version is None and registry.versions() == ["v0001", "v0002"]
