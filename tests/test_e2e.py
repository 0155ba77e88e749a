"""End to end with real parts: `prefect server start`, the work pools and a worker for each,
`make deploy` (prefect deploy from prefect.yaml), and `prefect deployment run` of the ad-hoc retrain,
which hops to the training deployment on the GPU pool. Small generated data, one epoch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fmnist.registry import Registry
from fmnist.storage import Store
from tests.helpers import synthetic_images, write_idx_batch, write_mirror
from tests.prefect_stack import Stack, make, prefect_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with prefect_server(tmp_path_factory.mktemp("e2e")) as stack:
        make(stack, "deploy")
        stack.start("worker-cpu", "worker", "start", "--pool", "fashion-mnist-cpu")
        stack.start("worker-gpu", "worker", "start", "--pool", "fashion-mnist-gpu")
        yield stack


@pytest.fixture(scope="module")
def run_params(stack: Stack) -> dict:
    spec = write_mirror(stack.tmp / "mirror", train_per_class=50, test_per_class=10)
    return {
        "mirrors": [str(stack.tmp / "mirror")],
        "dataset": spec.model_dump(),
        "training": {"epochs": 1},
        "promotion": {"min_accuracy": 0.5},
    }


def local_storage(stack: Stack, suffix: str = "") -> dict:
    return {"data_root": str(stack.tmp / f"data{suffix}"), "registry_root": str(stack.tmp / f"artifacts{suffix}")}


def start_deployment_run(stack: Stack, params: dict, storage: dict | None = None) -> subprocess.Popen:
    return stack.deployment_run("retrain-fashion-mnist/adhoc", params=params, storage=storage or local_storage(stack))


def deployment_run(stack: Stack, params: dict) -> dict:
    return stack.finished(start_deployment_run(stack, params))


def local_registry(folder: Path) -> Registry:
    return Registry(Store(), str(folder))


def test_deployments_from_prefect_yaml(stack: Stack) -> None:
    nightly = stack.get("/deployments/name/retrain-fashion-mnist/nightly")
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert nightly["work_pool_name"] == "fashion-mnist-cpu"
    assert nightly["parameters"] == {"training_deployment": "train-fashion-mnist/gpu"}
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert stack.get("/deployments/name/train-fashion-mnist/gpu")["work_pool_name"] == "fashion-mnist-gpu"
    for pool in ("fashion-mnist-cpu", "fashion-mnist-gpu"):
        assert stack.get(f"/work_pools/{pool}")["concurrency_limit"] == 1


def test_adhoc_run_trains_on_the_gpu_pool_and_registers(stack: Stack, run_params: dict) -> None:
    run = deployment_run(stack, run_params)
    assert run["state_type"] == "COMPLETED", run["state"]
    [training] = stack.child_runs(run["id"], "gpu")
    assert training["state_type"] == "COMPLETED" and training["work_pool_name"] == "fashion-mnist-gpu"
    assert training["parameters"]["run_dir"] == str(stack.tmp / "artifacts" / "runs" / run["id"])

    artifacts = stack.artifacts(run["id"])
    assert {"data-validation", "data-cache", "evaluation-report", "per-class-metrics", "confusion-matrix"} <= set(
        artifacts
    )
    assert "# v0001 promoted to champion" in artifacts["retrain-report"]
    assert float(stack.artifacts(training["id"])["training-progress"]) == 100.0

    registry = local_registry(stack.tmp / "artifacts")
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
    assert registry.manifest("v0001")["flow_run_id"] == run["id"]
    assert registry.damaged_files("v0001") == []


def test_bad_incoming_batch_fails_at_validation_and_leaves_the_registry(stack: Stack, run_params: dict) -> None:
    registry_root = stack.tmp / "artifacts"
    assert local_registry(registry_root).champion() == "v0001", "runs after the registering test"
    before = {p: p.read_bytes() for p in registry_root.rglob("*") if p.is_file()}
    labels = np.array([3, 10, 4], dtype=np.uint8)
    write_idx_batch(stack.tmp / "data" / "incoming" / "bad", synthetic_images(labels % 10, seed=2), labels)

    run = deployment_run(stack, run_params)
    assert run["state_type"] == "FAILED"
    tasks = stack.filter("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    states = {t["name"].rsplit("-", 1)[0]: t["state_type"] for t in tasks}
    assert states["validate"] == "FAILED" and "train" not in states and "register" not in states
    assert "Data validation **FAILED**" in stack.artifacts(run["id"])["data-validation"]
    assert {p: p.read_bytes() for p in registry_root.rglob("*") if p.is_file()} == before


def test_crashed_training_run_is_started_again_and_resumes(stack: Stack, run_params: dict) -> None:
    epochs = 60
    params = {**run_params, "training": {"epochs": epochs}}
    gpu_worker = next(p for p in stack.processes if "fashion-mnist-gpu" in p.args)
    cli = start_deployment_run(stack, params, local_storage(stack, "-crash"))
    # Once the training run has finished a few epochs, its process dies (as under the OOM killer);
    # the GPU worker survives and reports the run Crashed.
    deadline = time.monotonic() + 300
    killed_at = None
    while killed_at is None and time.monotonic() < deadline:
        histories = list((stack.tmp / "artifacts-crash" / "runs").glob("*/history.json"))
        done = len(json.loads(histories[0].read_text())["epochs"]) if histories else 0
        if 2 <= done < epochs - 10:
            pids = subprocess.run(["pgrep", "-P", str(gpu_worker.pid)], capture_output=True, text=True)
            for pid in pids.stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            killed_at = done if pids.stdout.split() else None
        time.sleep(0.05)
    assert killed_at, "never caught the training run between its 2nd and last epochs"

    run = stack.finished(cli)
    assert run["state_type"] == "COMPLETED", run["state"]
    training = stack.child_runs(run["id"], "gpu")
    assert [r["state_type"] for r in training] == ["CRASHED", "COMPLETED"]
    run_dir = stack.tmp / "artifacts-crash" / "runs" / run["id"]
    history = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # none lost, none twice
    resumes = [m for m in stack.logs([r["id"] for r in training]) if "Resuming from the backup" in m]
    assert len(resumes) == 1
    # Resumed, not restarted: after the last epoch whose backup was complete. history.json is written
    # before the backup, and one more epoch may have ended between reading it and the kill.
    assert 2 <= int(resumes[0].split("epoch ")[1].split(" ")[0]) <= killed_at + 2
    assert local_registry(stack.tmp / "artifacts-crash").champion() == "v0001"
