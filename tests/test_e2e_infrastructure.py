"""What the pipeline stands on fails, with real parts: a Prefect server on a PostgreSQL cluster of its
own (as `make server DB=postgres` runs it), killed and started again mid-training with its database;
a GPU worker stopped with SIGTERM (`systemctl stop`, a spot notice); the database lost between two
runs; and the API not there when a worker or a run is started. Small generated data."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fmnist.ops.postgres import LocalPostgres
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from tests.helpers import write_mirror
from tests.prefect_stack import ROOT, Stack, make, prefect_server, wait_for
from tests.processes import free_ports, stop, wait_until_ready

pytestmark = pytest.mark.e2e

FASHION_MNIST = str(Path(sys.executable).parent / "fashion-mnist")
HEARTBEAT_S = 30
# Down for less than the client's retry budget (five tries, 2 + 4 + 8 + 16 + 32 s apart).
SHORT_OUTAGE_S = 15
START_WINDOW_S = 60  # runs here start 7-10 s after a worker takes them
# Longer than that budget, and than the heartbeat automation's window (three heartbeats).
LONG_OUTAGE_S = 4 * HEARTBEAT_S


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with prefect_server(tmp_path_factory.mktemp("infra"), database="postgres") as stack:
        make(stack, "deploy", FMNIST_HEARTBEAT_S=str(HEARTBEAT_S), FMNIST_START_WINDOW_S=str(START_WINDOW_S))
        # As make worker-cpu / worker-gpu start them.
        stack.start("worker-cpu", "worker", "--pool", "fashion-mnist-cpu", prefect=FASHION_MNIST)
        stack.start("worker-gpu", "worker", "--pool", "fashion-mnist-gpu", prefect=FASHION_MNIST)
        yield stack


@pytest.fixture(scope="module")
def run_params(stack: Stack) -> dict:
    spec = write_mirror(stack.tmp / "mirror", train_per_class=100, test_per_class=10)
    return {
        "mirrors": [str(stack.tmp / "mirror")],
        "dataset": spec.model_dump(),
        # Small batches: epochs of a few seconds on 1,000 rows, long enough to act in the middle of one.
        "training": {"epochs": 6, "batch_size": 2, "steps_per_execution": 1},
        "promotion": {"min_accuracy": 0.5},
    }


def storage(stack: Stack, name: str) -> dict:
    return {"data_root": str(stack.tmp / f"data-{name}"), "registry_root": str(stack.tmp / f"artifacts-{name}")}


def start_run(stack: Stack, params: dict, name: str) -> subprocess.Popen:
    return stack.deployment_run("retrain-fashion-mnist/adhoc", params=params, storage=storage(stack, name))


def epochs_done(stack: Stack, name: str) -> int:
    histories = list((stack.tmp / f"artifacts-{name}" / "runs").glob("*/history.json"))
    return len(json.loads(histories[0].read_text())["epochs"]) if histories else 0


def epochs_backed_up(stack: Stack, name: str) -> int:
    """Epochs a resume would skip: Keras writes its metadata after the weights, so it names a whole backup."""
    for metadata in (stack.tmp / f"artifacts-{name}" / "runs").glob("*/backup/training_metadata.json"):
        try:
            return json.loads(metadata.read_text())["epoch"]  # epochs done
        except ValueError:  # caught mid-write (Keras writes it in place)
            return 0
    return 0


def registered_history(stack: Stack, name: str) -> tuple[list[str], list[int]]:
    """The registry's versions, and the epochs the newest one's history holds."""
    registry = Registry(Store(), str(stack.tmp / f"artifacts-{name}"))
    versions = registry.versions()
    history = json.loads(registry.store.read_bytes(registry.file(versions[-1], "history.json").location))
    return versions, [h["epoch"] for h in history["epochs"]]


def adhoc_runs(stack: Stack) -> list[dict]:
    return stack.filter("/flow_runs/filter", {"deployments": {"name": {"any_": ["adhoc"]}}})


@pytest.mark.recovery
def test_the_server_and_its_database_restarted_mid_training_the_run_completes_once(
    stack: Stack, run_params: dict
) -> None:
    before = {r["id"] for r in adhoc_runs(stack)}
    cli = start_run(stack, run_params, "restart")
    wait_for("the end of epoch 1", lambda: epochs_done(stack, "restart") >= 1, timeout_s=300, every_s=0.1)
    stack.stop_server(kill=True)
    stack.postgres.stop(kill=True)  # the database's host goes too; it recovers from its log at the start
    time.sleep(SHORT_OUTAGE_S)
    stack.postgres.start()
    stack.start_server()

    run = stack.finished(cli)
    assert run["state_type"] == "COMPLETED", run["state"]
    [training] = stack.child_runs(run["id"], "gpu")  # once: not crashed, not started again
    assert training["state_type"] == "COMPLETED" and training["run_count"] == 1
    versions, epochs = registered_history(stack, "restart")
    assert versions == ["v0001"] and epochs == list(range(1, 7))  # every epoch once
    # Nothing started that nobody asked for: no run of the trigger's deployment, no failed action.
    assert {r["id"] for r in adhoc_runs(stack)} - before == {run["id"]}
    failed = stack.filter("/events/filter", {"filter": {"event": {"name": ["prefect.automation.action.failed"]}}})
    assert failed["events"] == []


@pytest.mark.slow
def test_the_server_down_longer_than_its_clients_retry_the_work_is_finished_once(
    stack: Stack, run_params: dict
) -> None:
    """Past the budget, calls fail: the training run goes on without reporting its epochs, and the
    retraining run waits for it. Back after the heartbeat window, the server marks both Crashed; the
    training run stops at its next epoch, the retraining run takes itself back and starts it again."""
    cli = start_run(stack, run_params, "long-outage")
    wait_for("the end of epoch 1", lambda: epochs_done(stack, "long-outage") >= 1, timeout_s=300, every_s=0.1)
    stack.stop_server(kill=True)
    time.sleep(LONG_OUTAGE_S)
    stack.start_server()

    first_end = stack.finished(cli)  # Crashed, by the heartbeat automation, as the server came back

    def completed() -> dict | None:
        run = stack.get(f"/flow_runs/{first_end['id']}")
        return run if run["state_type"] == "COMPLETED" else None

    run = wait_for("the retraining run, taken back, to complete", completed, timeout_s=600)
    said = stack.logs([run["id"]])
    trainings = stack.child_runs(run["id"], "gpu")
    print("retraining run:", first_end["state"]["message"], "then", [m for m in said if "Back to Running" in m])
    print("training runs:", [(r["state_name"], r["state"]["message"]) for r in trainings])
    assert any("Back to Running: this run was marked Crashed (No heartbeat" in m for m in said)
    # The training run stopped, or was crashed, and the one started in its place completed.
    assert len(trainings) == 2 and trainings[-1]["state_type"] == "COMPLETED"
    assert registered_history(stack, "long-outage")[0] == ["v0001"]  # one version, though it trained twice


@pytest.mark.recovery
def test_a_worker_stopped_with_sigterm_hands_its_run_on_and_frees_the_slot(stack: Stack, run_params: dict) -> None:
    """`systemctl stop` signals the worker and the run it started together; a new worker resumes it."""
    cli = start_run(stack, run_params, "sigterm")
    # The backup, not the history: an epoch is recorded (and reported) before it is backed up.
    wait_for("the backup of epoch 1", lambda: epochs_backed_up(stack, "sigterm") >= 1, timeout_s=300, every_s=0.1)
    worker = next(p for p in stack.processes if "fashion-mnist-gpu" in p.args and p.poll() is None)
    [parent] = [r for r in adhoc_runs(stack) if r["state_type"] == "RUNNING"]
    [training] = stack.child_runs(parent["id"], "gpu")
    os.killpg(worker.pid, signal.SIGTERM)
    stopped_at = time.monotonic()

    def left_running() -> dict | None:
        state = stack.get(f"/flow_runs/{training['id']}")
        return state if state["state_type"] != "RUNNING" else None

    after = wait_for("the stopped training run to leave Running", left_running, timeout_s=80, every_s=0.2)
    print(f"SIGTERM to the training run's slot free: {time.monotonic() - stopped_at:.1f} s ({after['state_name']})")
    # Crashed by the stop (the hand-back, or Prefect's engine when the signal reaches it first), not by
    # the heartbeat watch minutes later.
    assert after["state_type"] == "CRASHED" and "No heartbeat" not in after["state"]["message"], after["state"]
    assert worker.wait(timeout=60) == 0
    stack.start("worker-gpu-replacement", "worker", "--pool", "fashion-mnist-gpu", prefect=FASHION_MNIST)

    run = stack.finished(cli)
    assert run["state_type"] == "COMPLETED", run["state"]
    # The pool holds one run at a time: the replacement got the freed slot, and resumed the run.
    assert [r["state_type"] for r in stack.child_runs(run["id"], "gpu")] == ["CRASHED", "COMPLETED"]
    versions, epochs = registered_history(stack, "sigterm")
    assert versions == ["v0001"] and epochs == list(range(1, 7))
    resumed = [m for m in stack.logs([r["id"] for r in stack.child_runs(run["id"], "gpu")]) if "Resuming" in m]
    assert len(resumed) == 1, resumed


@pytest.mark.recovery
def test_a_run_taken_by_a_worker_that_never_starts_is_crashed_and_frees_its_slot(stack: Stack) -> None:
    """A worker lost between taking a run (Pending) and starting it: no heartbeat ever comes, and the
    deployment's one slot stays taken, so every later run would wait. The start watch crashes it."""
    adhoc = stack.get("/deployments/name/retrain-fashion-mnist/adhoc")
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()  # no worker takes it itself
    scheduled = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}}
    run_id = stack.post(f"/deployments/{adhoc['id']}/create_flow_run", scheduled)["id"]
    # As a worker takes a run: Pending, which takes the deployment's slot.
    taken = stack.post(f"/flow_runs/{run_id}/set_state", {"state": {"type": "PENDING"}})
    assert taken["status"] == "ACCEPT", taken
    taken_at = time.monotonic()
    assert stack.get(f"/deployments/{adhoc['id']}")["global_concurrency_limit"]["active_slots"] == 1

    def crashed() -> dict | None:
        run = stack.get(f"/flow_runs/{run_id}")
        return run if run["state_type"] != "PENDING" else None

    run = wait_for("the run that never started to be crashed", crashed, timeout_s=START_WINDOW_S + 90, every_s=1)
    print(f"a run taken and never started: {run['state_name']} after {time.monotonic() - taken_at:.0f} s")
    assert run["state_type"] == "CRASHED" and f"Not started {START_WINDOW_S} s after" in run["state"]["message"]
    assert stack.get(f"/deployments/{adhoc['id']}")["global_concurrency_limit"]["active_slots"] == 0


class DatabaseChaos(threading.Thread):
    """After DBOS's chaos tests: the server's PostgreSQL stopped every 5-20 s (a crash or a fast
    shutdown, by chance) and started again 0-5 s later, until told to stop."""

    def __init__(self, postgres: LocalPostgres, seed: int) -> None:
        super().__init__(daemon=True)
        self.postgres, self.rng = postgres, random.Random(seed)
        self.stopping = threading.Event()
        self.outages: list[float] = []

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(5, 20)):
            self.postgres.stop(kill=self.rng.random() < 0.5)
            down_s = self.rng.uniform(0, 5)
            time.sleep(down_s)
            self.postgres.start()
            self.outages.append(down_s)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


CHAOS_RUNS = 4


@pytest.mark.slow
def test_runs_through_a_database_restarted_every_few_seconds_all_complete_once(stack: Stack, run_params: dict) -> None:
    """Every run completes; their versions are distinct and contiguous; the champion chain checks out."""
    chaos = DatabaseChaos(stack.postgres, seed=22)
    params = {**run_params, "force_retrain": True, "training": {**run_params["training"], "epochs": 2}}
    started = time.monotonic()
    chaos.start()
    try:
        clis = [start_run(stack, params, "chaos") for _ in range(CHAOS_RUNS)]
        runs = [stack.finished(cli, timeout_s=1200) for cli in clis]
    finally:
        chaos.stop()
    print(
        f"chaos: {CHAOS_RUNS} runs in {time.monotonic() - started:.0f} s through {len(chaos.outages)} database "
        f"restarts (down {min(chaos.outages, default=0):.1f}-{max(chaos.outages, default=0):.1f} s)"
    )
    assert [r["state_type"] for r in runs] == ["COMPLETED"] * CHAOS_RUNS, [r["state"] for r in runs]
    assert len(chaos.outages) >= CHAOS_RUNS  # the database did go away while they ran
    registry = Registry(Store(), str(stack.tmp / "artifacts-chaos"))
    assert registry.versions() == [f"v{n:04d}" for n in range(1, CHAOS_RUNS + 1)]
    promotions = registry.promotions()  # raises on a gap or a damaged entry
    assert [p["sequence"] for p in promotions] == list(range(1, len(promotions) + 1))
    assert {p["version"] for p in promotions} <= set(registry.versions())
    assert registry.champion() == promotions[-1]["version"]  # the pointer agrees with the log
    for run in runs:
        assert [r["state_type"] for r in stack.child_runs(run["id"], "gpu")][-1] == "COMPLETED"


@pytest.mark.slow
def test_a_lost_database_starts_over_from_the_registry(stack: Stack, run_params: dict) -> None:
    """Runs after the database is gone (a fresh server): the registry in storage says the champion is
    current, and nothing is trained again. Runs last: it replaces the stack's database."""
    first = stack.finished(start_run(stack, run_params, "lost-database"))
    assert first["state_type"] == "COMPLETED", first["state"]
    versions_before, _ = registered_history(stack, "lost-database")
    stack.stop_server(kill=False)
    stack.postgres.stop()
    shutil.rmtree(stack.postgres.folder)
    stack.postgres = LocalPostgres(stack.postgres.folder)
    stack.postgres.start()
    stack.start_server()
    assert adhoc_runs(stack) == []  # nothing of the old server's is left
    make(stack, "deploy", FMNIST_HEARTBEAT_S=str(HEARTBEAT_S))

    run = stack.finished(start_run(stack, run_params, "lost-database"))
    assert run["state_type"] == "COMPLETED", run["state"]
    assert stack.child_runs(run["id"], "gpu") == []  # nothing trained
    assert any("is current" in m for m in stack.logs([run["id"]]))
    assert registered_history(stack, "lost-database")[0] == versions_before


@pytest.mark.parametrize("target", ["worker-gpu", "retrain-now"])
def test_started_while_the_api_is_down_fails_in_bounded_time_naming_the_url(target: str, tmp_path: Path) -> None:
    [port] = free_ports(1)
    started = time.monotonic()
    done = subprocess.run(
        ["make", target, f"PREFECT_PORT={port}", "API_WAIT_S=3"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    waited = time.monotonic() - started
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"the Prefect API at http://127.0.0.1:{port}/api did not answer in 3 s" in said, said
    assert said.count("is not answering") >= 2  # each try is shown
    print(f"make {target} with no API: failed after {waited:.1f} s")


def test_make_server_db_postgres_keeps_its_cluster_and_password_to_itself(tmp_path: Path) -> None:
    [port] = free_ports(1)
    home = tmp_path / "prefect-home"
    log = tmp_path / "make-server.log"
    above = {str(f): f.stat().st_mode for f in [tmp_path, *tmp_path.parents]}
    with log.open("w") as out:
        server = subprocess.Popen(
            ["make", "server", "DB=postgres", f"PREFECT_PORT={port}", f"PREFECT_HOME={home}"],
            cwd=ROOT,
            env={**os.environ, "PREFECT_HOME": str(home)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/api/health", server, log)
        cluster = home / "postgres"
        assert (cluster / "data" / "PG_VERSION").exists()
        assert (cluster / "password").stat().st_mode & 0o777 == 0o600
        assert (cluster / "postgres.log").stat().st_mode & 0o777 == 0o600
        assert {str(f): f.stat().st_mode for f in [tmp_path, *tmp_path.parents]} == above  # none widened
        password = (cluster / "password").read_text().strip()
        assert len(password) >= 24
        # The server's state is in it, over loopback: a pool made now is a row there.
        made = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "in-postgres", "--type", "process"],
            env={**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stdout + made.stderr
        assert not list(home.glob("*.db")), "the server must not have fallen back to SQLite"
        sessions = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "postgres: prefect prefect 127.0.0.1(" in sessions  # the server's sessions, from loopback
        said = log.read_text()
        assert "PostgreSQL made and started on 127.0.0.1:" in said and password not in said
        assert password not in (cluster / "postgres.log").read_text()
        handed = [cluster / "initdb-password", LocalPostgres(cluster).data_dir.parent / "initdb-password"]
        assert not any(path.exists() for path in handed)
    finally:
        stop(server)
        LocalPostgres(home / "postgres").remove()  # its data too, wherever it lives (as root: postgres's home)
