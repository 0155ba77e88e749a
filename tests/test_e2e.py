"""End to end with real parts: `prefect server start`, the work pools and a worker for each,
`make deploy` (prefect deploy from prefect.yaml), and `prefect deployment run` of the ad-hoc retrain,
which hops to the training deployment on the GPU pool. Small generated data, one epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from fmnist.registry import Registry
from fmnist.storage import Store
from tests.helpers import synthetic_images, write_idx_batch, write_mirror

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]
    api: str
    tmp: Path
    gpu_worker: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(api: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop a process and everything it started (workers run flows in child processes)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [PREFECT, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        processes.append(process)
        return process

    try:
        server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_until_healthy(api, server, tmp / "server.log")
        deploy = subprocess.run(
            ["make", "deploy", f"PREFECT_PORT={port}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        start("worker-cpu", "worker", "start", "--pool", "fashion-mnist-cpu")
        gpu_worker = start("worker-gpu", "worker", "start", "--pool", "fashion-mnist-gpu")
        yield Stack(env, api, tmp, gpu_worker)
    finally:
        for process in reversed(processes):
            stop(process)


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
    """`prefect deployment run --watch` as an operator types it."""
    return subprocess.Popen(
        [
            *(PREFECT, "deployment", "run", "retrain-fashion-mnist/adhoc"),
            *("--param", f"params={json.dumps(params)}"),
            *("--param", f"storage={json.dumps(storage or local_storage(stack))}"),
            *("--watch", "--watch-interval", "2", "--watch-timeout", "600"),
        ],
        cwd=ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished_run(stack: Stack, cli: subprocess.Popen) -> dict:
    """Wait for the watching CLI to end; the flow run as the API has it."""
    stdout, stderr = cli.communicate(timeout=700)
    match = re.search(r"UUID:\s+([0-9a-f-]{36})", stdout)
    assert match, stdout[-3000:] + stderr[-3000:]
    return api_get(stack, f"/flow_runs/{match.group(1)}")


def deployment_run(stack: Stack, params: dict) -> dict:
    return finished_run(stack, start_deployment_run(stack, params))


def local_registry(folder: Path) -> Registry:
    return Registry(Store(), str(folder))


def api_get(stack: Stack, path: str) -> dict:
    response = httpx.get(stack.api + path, timeout=30)
    response.raise_for_status()
    return response.json()


def api_filter(stack: Stack, path: str, body: dict) -> list[dict]:
    response = httpx.post(stack.api + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def artifact_keys(stack: Stack, flow_run_id: str) -> dict[str, str]:
    found = api_filter(stack, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: str(a["data"]) for a in found}


def test_deployments_from_prefect_yaml(stack: Stack) -> None:
    nightly = api_get(stack, "/deployments/name/retrain-fashion-mnist/nightly")
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert nightly["work_pool_name"] == "fashion-mnist-cpu"
    assert nightly["parameters"] == {"training_deployment": "train-fashion-mnist/gpu"}
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert api_get(stack, "/deployments/name/train-fashion-mnist/gpu")["work_pool_name"] == "fashion-mnist-gpu"
    for pool in ("fashion-mnist-cpu", "fashion-mnist-gpu"):
        assert api_get(stack, f"/work_pools/{pool}")["concurrency_limit"] == 1


def test_adhoc_run_trains_on_the_gpu_pool_and_registers(stack: Stack, run_params: dict) -> None:
    run = deployment_run(stack, run_params)
    assert run["state_type"] == "COMPLETED", run["state"]
    [training] = api_filter(
        stack,
        "/flow_runs/filter",
        {"deployments": {"name": {"any_": ["gpu"]}}, "flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}},
    )
    assert training["state_type"] == "COMPLETED" and training["work_pool_name"] == "fashion-mnist-gpu"
    assert training["parameters"]["run_dir"] == str(stack.tmp / "artifacts" / "runs" / run["id"])

    artifacts = artifact_keys(stack, run["id"])
    assert {"data-validation", "data-cache", "evaluation-report", "per-class-metrics", "confusion-matrix"} <= set(
        artifacts
    )
    assert "# v0001 promoted to champion" in artifacts["retrain-report"]
    assert float(artifact_keys(stack, training["id"])["training-progress"]) == 100.0

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
    tasks = api_filter(stack, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    states = {t["name"].rsplit("-", 1)[0]: t["state_type"] for t in tasks}
    assert states["validate"] == "FAILED" and "train" not in states and "register" not in states
    assert "Data validation **FAILED**" in artifact_keys(stack, run["id"])["data-validation"]
    assert {p: p.read_bytes() for p in registry_root.rglob("*") if p.is_file()} == before


def test_crashed_training_run_is_started_again_and_resumes(stack: Stack, run_params: dict) -> None:
    epochs = 60
    params = {**run_params, "training": {"epochs": epochs}}
    cli = start_deployment_run(stack, params, local_storage(stack, "-crash"))
    # Once the training run has finished a few epochs, its process dies (as under the OOM killer);
    # the GPU worker survives and reports the run Crashed.
    deadline = time.monotonic() + 300
    killed_at = None
    while killed_at is None and time.monotonic() < deadline:
        histories = list((stack.tmp / "artifacts-crash" / "runs").glob("*/history.json"))
        done = len(json.loads(histories[0].read_text())["epochs"]) if histories else 0
        if 2 <= done < epochs - 10:
            pids = subprocess.run(["pgrep", "-P", str(stack.gpu_worker.pid)], capture_output=True, text=True)
            for pid in pids.stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            killed_at = done if pids.stdout.split() else None
        time.sleep(0.05)
    assert killed_at, "never caught the training run between its 2nd and last epochs"

    run = finished_run(stack, cli)
    assert run["state_type"] == "COMPLETED", run["state"]
    training = api_filter(
        stack,
        "/flow_runs/filter",
        {"deployments": {"name": {"any_": ["gpu"]}}, "flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}},
    )
    assert [r["state_type"] for r in sorted(training, key=lambda r: r["created"])] == ["CRASHED", "COMPLETED"]
    run_dir = stack.tmp / "artifacts-crash" / "runs" / run["id"]
    history = json.loads((run_dir / "history.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # none lost, none twice
    resumed = api_filter(
        stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [r["id"] for r in training]}}, "limit": 200}
    )
    resumes = [log["message"] for log in resumed if "Resuming from the backup" in log["message"]]
    assert len(resumes) == 1
    # Resumed, not restarted: after the last epoch whose backup was complete. history.json is written
    # before the backup, and one more epoch may have ended between reading it and the kill.
    assert 2 <= int(resumes[0].split("epoch ")[1].split(" ")[0]) <= killed_at + 2
    assert local_registry(stack.tmp / "artifacts-crash").champion() == "v0001"
