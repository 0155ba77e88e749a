"""Workers act only on their own runs and stop in bounded time; a run declared dead never trains beside
its replacement. A real Prefect server (SQLite), `fashion-mnist worker` as `make worker-*` starts it, and
a deployment of a flow that only waits (`tests/worker_doubles.py`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from fmnist.ops.worker import WORKER_STOP_S
from tests.prefect_stack import ROOT, Stack, prefect_server, wait_for

pytestmark = pytest.mark.e2e

FASHION_MNIST = str(Path(sys.executable).parent / "fashion-mnist")
POOL = "waiting-pool"
STOP_WITHIN_S = 30  # the bound given to the worker here (WORKER_STOP_S by default), to keep the test short


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with prefect_server(tmp_path_factory.mktemp("workers")) as stack:
        stack.post("/work_pools/", {"name": POOL, "type": "process"})
        flow_id = stack.post("/flows/", {"name": "waits"})["id"]
        stack.deployment = stack.post(  # type: ignore[attr-defined]
            "/deployments/",
            {
                "name": "waits",
                "flow_id": flow_id,
                "work_pool_name": POOL,
                "entrypoint": "tests/worker_doubles.py:waits",
                "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
            },
        )["id"]
        yield stack


def start_worker(stack: Stack, name: str, *options: str) -> subprocess.Popen:
    return stack.start(name, "worker", "--pool", POOL, *options, prefect=FASHION_MNIST)


def running_on_worker(stack: Stack, stubborn: bool = False) -> dict:
    """A run of the waiting deployment, taken by a worker: once it runs and its process is known."""
    body = {"parameters": {"stubborn": stubborn}}
    run_id = stack.post(f"/deployments/{stack.deployment}/create_flow_run", body)["id"]

    def running() -> dict | None:
        run = stack.get(f"/flow_runs/{run_id}")
        return run if run["state_type"] == "RUNNING" and run["infrastructure_pid"] else None

    return wait_for(f"run {run_id} to run on the worker", running, timeout_s=120)


def foreign_run(stack: Stack, infrastructure_pid: str) -> dict:
    """A run of the same pool that another host's worker runs, in a process with the PID given."""
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()  # no worker here takes it
    scheduled = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}}
    run_id = stack.post(f"/deployments/{stack.deployment}/create_flow_run", scheduled)["id"]
    for state in ("PENDING", "RUNNING"):
        stack.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": state}, "force": True})
    response = httpx.patch(f"{stack.api}/flow_runs/{run_id}", json={"infrastructure_pid": infrastructure_pid})
    assert response.status_code == 204, response.text
    return stack.get(f"/flow_runs/{run_id}")


@pytest.mark.recovery
def test_a_late_start_of_a_run_declared_dead_trains_nothing(stack: Stack, tmp_path: Path) -> None:
    """The start watch marked the training run Crashed while it was Pending, and its replacement was
    started; then its own process starts. Prefect accepts Running from Crashed: the run must stop
    before it trains or writes."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed, Pending

    from flows.train import train
    from fmnist.storage.layout import RunLayout, StorageParams
    from fmnist.training.model import TrainParams
    from tests.helpers import learnable_cache

    cached = learnable_cache(tmp_path / "cache")
    run_folder = tmp_path / "artifacts" / "runs" / "r1"
    parameters = {
        "cached": cached,
        "params": TrainParams(epochs=1),
        "run": RunLayout(str(run_folder)),
        "storage": StorageParams(data_root=str(tmp_path / "data"), registry_root=str(tmp_path / "artifacts")),
    }
    with temporary_settings({PREFECT_API_URL: stack.api}):
        with get_client(sync_client=True) as client:
            made = client.create_flow_run(train, parameters={**parameters, "cached": asdict(cached)}, state=Pending())
            watched = client.set_flow_run_state(
                made.id, Crashed(message="Not started 60 s after it was handed to a worker"), force=False
            )
            assert watched.status.value == "ACCEPT"
            late = client.read_flow_run(made.id)
        state = run_flow(train, flow_run=late, parameters=parameters, return_type="state")
    assert state.is_failed(), state
    assert "TrainingRunSuperseded" in state.message and "was marked Crashed" in state.message, state.message
    assert "Not started 60 s after" in state.message and "before it trains or writes" in state.message
    assert not run_folder.exists() or not any(run_folder.iterdir()), list(run_folder.rglob("*"))


@pytest.mark.recovery
def test_a_stopped_worker_hands_back_its_own_run_and_no_other_hosts_with_the_same_pid(stack: Stack) -> None:
    worker = start_worker(stack, "worker-own-runs")
    ours = running_on_worker(stack)
    theirs = foreign_run(stack, ours["infrastructure_pid"])  # PIDs repeat across hosts
    os.killpg(worker.pid, signal.SIGTERM)  # as systemctl stop: the worker and the run it started together
    assert worker.wait(timeout=WORKER_STOP_S + 15) == 0
    said = (stack.tmp / "worker-own-runs.log").read_text()
    assert stack.get(f"/flow_runs/{ours['id']}")["state_type"] == "CRASHED", said[-3000:]
    after = stack.get(f"/flow_runs/{theirs['id']}")
    assert after["state_type"] == "RUNNING", (after["state"], said[-3000:])
    assert "runs handed back:" in said and ours["name"] in said and theirs["name"] not in said


@pytest.mark.recovery
def test_a_worker_stopped_as_the_api_goes_exits_in_bounded_time_naming_what_it_could_not_hand_back(
    stack: Stack,
) -> None:
    """SIGTERM a few seconds before the server stops, while its run is slow to stop: Prefect's worker
    hangs on its way out (its cancellation observer), and without a bound the worker never exits."""
    worker = start_worker(stack, "worker-api-gone", "--stop-within-s", str(STOP_WITHIN_S))
    ours = running_on_worker(stack, stubborn=True)
    stack.stop_server(kill=True)
    time.sleep(2)
    os.kill(worker.pid, signal.SIGTERM)
    stopped_at = time.monotonic()
    try:
        code = worker.wait(timeout=STOP_WITHIN_S + 15)
        took = time.monotonic() - stopped_at
    finally:
        stack.start_server()  # for the tests after this one
    said = (stack.tmp / "worker-api-gone.log").read_text()
    print(f"worker stopped with the API gone: exited {code} after {took:.1f} s")
    assert took <= STOP_WITHIN_S + 5, said[-3000:]
    assert code != 0
    assert f"could not hand back its runs {ours['id']}" in said, said[-3000:]
    assert not any(str(ours["infrastructure_pid"]) == pid for pid in os.listdir("/proc")), "its run's process lives"


def test_a_run_process_on_its_way_out_keeps_the_run_id_noted_for_it() -> None:
    """A flow-run process that is exiting (here: exited, not yet reaped) is still listed in /proc, but its
    environment reads empty. Prefect's worker, told by the same `systemctl stop`, stops its runs as the
    worker notes them: the run id read before must stay with the process, or its run is never handed back
    (it stayed Running until the heartbeat watch crashed it)."""
    from fmnist.ops.worker import keeping_run_ids, processes_below

    run_id = "0f0f0f0f-1111-2222-3333-444444444444"
    child = subprocess.Popen(["sleep", "0.5"], env={**os.environ, "PREFECT__FLOW_RUN_ID": run_id})
    try:
        before = processes_below(os.getpid())
        assert before[child.pid].run_id == run_id
        exited = lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # noqa: E731
        wait_for("the run process to exit", exited, timeout_s=10, every_s=0.05)
        now = processes_below(os.getpid())
        assert now[child.pid].run_id is None  # what /proc tells of it now
        assert keeping_run_ids(before, now)[child.pid].run_id == run_id
    finally:
        child.wait()
    # A PID taken by another process since (another start time) keeps nothing of the one before.
    reused = {child.pid: replace(before[child.pid], started=before[child.pid].started + 1, run_id=None)}
    assert keeping_run_ids(before, reused)[child.pid].run_id is None
