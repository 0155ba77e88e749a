"""End to end with real parts: `prefect server start`, the work pools and a worker for each,
`make webhook` and `make deploy` (prefect deploy from prefect.yaml, automations.yaml), and `prefect
deployment run` of the ad-hoc retrain, which hops to the training deployment on the GPU pool; an
operator's webhook endpoint on loopback receives the notifications. Small generated data.

Runs send heartbeats every 30 s (Prefect's minimum), so a lost host is found within 90 s."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import pytest

from fmnist.data.incoming import add_batch, collect_incoming
from fmnist.ops import events
from fmnist.ops.worker import RETRIED_SERVER_ERRORS
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from fmnist.storage.layout import StorageParams
from fmnist.training.supervision import TrainingRunSilent, wait_for_run
from tests.helpers import synthetic_images, write_idx_batch, write_mirror
from tests.prefect_stack import (
    ROOT,
    Stack,
    WebhookReceiver,
    local_storage,
    make,
    prefect_server,
    small_run_params,
    start_deployment_run,
    wait_for,
)
from tests.rollout_doubles import SWAPPED, Versions, answers, register, roll_out, totals, traffic, write_windows
from tests.training_doubles import PLAN

pytestmark = pytest.mark.e2e


HEARTBEAT_S = 30
# Between the first batch and the rest: under the trigger's 60 s window, and over the 5 s the test allows
# between the run and the last batch, so a window counted from the first batch would be caught.
DEBOUNCE_TEST_GAP_S = 12
AUTOMATIONS = {
    "fashion-mnist: crash runs whose heartbeats stopped",
    "fashion-mnist: crash runs that never started",
    "fashion-mnist: tell the operator",
    "fashion-mnist: tell the operator about crashed runs",
}


@pytest.fixture(scope="module")
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, webhook: WebhookReceiver) -> Iterator[Stack]:
    with prefect_server(tmp_path_factory.mktemp("e2e"), database="postgres") as stack:
        make(stack, "webhook", WEBHOOK_URL=webhook.url, FMNIST_HEARTBEAT_S=str(HEARTBEAT_S))
        make(stack, "deploy", FMNIST_HEARTBEAT_S=str(HEARTBEAT_S))
        make(stack, "deploy", FMNIST_HEARTBEAT_S=str(HEARTBEAT_S))  # twice, as operators do
        quiet_schedules(stack, "judge-rollout/judge", "watch-champion/watch")
        stack.start("worker-cpu", "worker", "start", "--pool", "fashion-mnist-cpu")
        stack.start("worker-gpu", "worker", "start", "--pool", "fashion-mnist-gpu")
        stack.start("worker-watch", "worker", "start", "--pool", "fashion-mnist-watch")
        yield stack


def quiet_schedules(stack: Stack, *deployments: str) -> None:
    """Pause these deployments' schedules and delete the runs they made: the single-host judge and watch run
    on the project's own registry (the default storage), which a test must not touch. Their triggers stay."""
    for name in deployments:
        deployment = stack.get(f"/deployments/name/{name}")
        for schedule in deployment["schedules"]:
            response = httpx.patch(
                f"{stack.api}/deployments/{deployment['id']}/schedules/{schedule['id']}", json={"active": False}
            )
            response.raise_for_status()
        made = stack.filter("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}})
        for run in made:
            httpx.delete(f"{stack.api}/flow_runs/{run['id']}").raise_for_status()


@pytest.fixture(scope="module")
def run_params(stack: Stack) -> dict:
    return small_run_params(stack.tmp / "mirror")


def deployment_run(stack: Stack, params: dict) -> dict:
    return stack.finished(start_deployment_run(stack, params))


def local_registry(folder: Path) -> Registry:
    return Registry(Store(), str(folder))


def test_deployments_from_prefect_yaml(stack: Stack) -> None:
    nightly = stack.get("/deployments/name/retrain-fashion-mnist/nightly")
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert nightly["work_pool_name"] == "fashion-mnist-cpu"
    assert nightly["parameters"] == {
        "training_deployment": "train-fashion-mnist/gpu",
        # The best preset, every night, rolled out as the canary: unattended, it earns its traffic live.
        "params": {"training": {"preset": "cnn"}, "promotion": {"rollout": "canary"}},
    }
    adhoc = stack.get("/deployments/name/retrain-fashion-mnist/adhoc")
    assert adhoc["parameters"] == {"training_deployment": "train-fashion-mnist/gpu"}  # the defaults: quick
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert stack.get("/deployments/name/train-fashion-mnist/gpu")["work_pool_name"] == "fashion-mnist-gpu"
    for pool in ("fashion-mnist-cpu", "fashion-mnist-gpu"):
        assert stack.get(f"/work_pools/{pool}")["concurrency_limit"] == 1
    assert stack.get("/work_pools/fashion-mnist-watch")["concurrency_limit"] == 2  # the judge never behind the watch
    for name, every_s in (("judge-rollout/judge", 300), ("watch-champion/watch", 3600)):
        deployment = stack.get(f"/deployments/name/{name}")
        assert deployment["work_pool_name"] == "fashion-mnist-watch"  # never queued behind a retrain
        assert [s["schedule"]["interval"] for s in deployment["schedules"]] == [every_s]


def test_the_pools_command_creates_updates_and_refuses_what_it_would_break(stack: Stack) -> None:
    """`fashion-mnist pools` (make pools): a pool created, then updated (its limit, unpaused); a pool of another
    type, or a limit of no runs, refused before anything changes, naming what."""
    created = stack.cli("pools", "--pool", "fmnist-spare=3")
    assert created.returncode == 0 and "'fmnist-spare' created (at most 3 at once)" in created.stdout, created
    spare = stack.get("/work_pools/fmnist-spare")
    assert spare["type"] == "process" and spare["concurrency_limit"] == 3
    assert spare["base_job_template"]["job_configuration"]["command"]  # the process worker's template
    httpx.patch(f"{stack.api}/work_pools/fmnist-spare", json={"is_paused": True}, timeout=30).raise_for_status()
    updated = stack.cli("pools", "--pool", "fmnist-spare=4")
    assert updated.returncode == 0 and "'fmnist-spare' updated (at most 4 at once)" in updated.stdout, updated
    spare = stack.get("/work_pools/fmnist-spare")
    assert spare["concurrency_limit"] == 4 and spare["is_paused"] is False

    stack.post("/work_pools/", {"name": "fmnist-other-type", "type": "kubernetes"})
    refused = stack.cli("pools", "--pool", "fmnist-spare=1", "--pool", "fmnist-other-type=1", "--pool", "fmnist-new=1")
    assert refused.returncode == 1 and "'fmnist-other-type' is of type 'kubernetes'" in refused.stderr, refused
    assert stack.get("/work_pools/fmnist-spare")["concurrency_limit"] == 4  # nothing changed
    assert httpx.get(f"{stack.api}/work_pools/fmnist-new", timeout=30).status_code == 404
    bad = stack.cli("pools", "--pool", "fmnist-spare=0")  # (each bad NAME=LIMIT: tests/test_flags.py)
    assert bad.returncode == 2 and "'fmnist-spare=0'" in bad.stderr, bad.stderr
    assert stack.get("/work_pools/fmnist-spare")["concurrency_limit"] == 4


def test_the_servers_scheduler_makes_the_nightly_runs(stack: Stack) -> None:
    """The schedule is more than a record: the server inserts the coming nights' runs. Neither Prefect
    3.8.8 under SQLAlchemy 2.1 ("Can't evaluate bulk DML statement") nor 3.9.1 on Python 3.11 ("tzinfo
    must be of type ZoneInfo") did: each failed at every try, in the server's log only."""
    nightly = stack.get("/deployments/name/retrain-fashion-mnist/nightly")

    def scheduled() -> list[dict]:
        runs = stack.filter("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [nightly["id"]]}}})
        return [r for r in runs if r["auto_scheduled"]]

    try:
        runs = wait_for("the scheduler's nightly runs", scheduled, timeout_s=150, every_s=2)
    except AssertionError:
        errors = [m for m in (stack.tmp / "server.log").read_text().splitlines() if "Error" in m]
        raise AssertionError(f"no nightly run scheduled; the server says: {errors[-2:]}") from None
    berlin = [datetime.fromisoformat(r["expected_start_time"]).astimezone(ZoneInfo("Europe/Berlin")) for r in runs]
    assert all((t.hour, t.minute) == (2, 0) for t in berlin), berlin
    assert len({t.date() for t in berlin}) == len(runs)  # one a night
    assert all(r["state_type"] == "SCHEDULED" and r["parameters"] == nightly["parameters"] for r in runs)


def test_deploying_twice_leaves_one_of_each_automation(stack: Stack) -> None:
    automations = stack.filter("/automations/filter", {})
    names = [a["name"] for a in automations]
    assert sorted(n for n in names if n.startswith("fashion-mnist: ")) == sorted(AUTOMATIONS)
    assert names.count("adhoc__automation_1") == 1, "the new-batch trigger of prefect.yaml, once"
    crash = next(a for a in automations if a["name"] == "fashion-mnist: crash runs whose heartbeats stopped")
    assert crash["trigger"]["within"] == 3 * HEARTBEAT_S
    gpu = stack.get("/deployments/name/train-fashion-mnist/gpu")
    assert gpu["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_S)
    # The runs retry what a server without its database answers, as fashion-mnist worker does.
    assert gpu["job_variables"]["env"]["PREFECT_CLIENT_RETRY_EXTRA_CODES"] == RETRIED_SERVER_ERRORS


def test_adhoc_run_trains_on_the_gpu_pool_and_registers(stack: Stack, run_params: dict, webhook) -> None:
    run = deployment_run(stack, run_params)
    assert run["state_type"] == "COMPLETED", run["state"]
    [training] = stack.child_runs(run["id"], "gpu")
    assert training["state_type"] == "COMPLETED" and training["work_pool_name"] == "fashion-mnist-gpu"
    assert training["parameters"]["run"] == {"location": str(stack.tmp / "artifacts" / "runs" / run["id"])}

    artifacts = stack.artifacts(run["id"])
    assert {"data-validation", "data-cache", "evaluation-report", "per-class-metrics", "confusion-matrix"} <= set(
        artifacts
    )
    assert "# v0001 promoted to champion" in artifacts["retrain-report"]
    assert float(stack.artifacts(training["id"])["training-progress"]) == 100.0

    registry = local_registry(stack.tmp / "artifacts")
    assert registry.versions() == ["v0001"] and registry.champion() == "v0001"
    assert registry.manifest("v0001").flow_run_id == run["id"]
    assert registry.damaged_files("v0001") == []
    # The operator hears of it: what happened, which run, and a link to it.
    promoted = webhook.wait_for("fashion-mnist.model.promoted", "v0001", run["name"])
    assert f"/runs/flow-run/{run['id']}" in promoted["text"], promoted


def test_bad_incoming_batch_fails_the_run_and_leaves_the_registry(
    stack: Stack, run_params: dict, webhook: WebhookReceiver
) -> None:
    registry_root = stack.tmp / "artifacts"
    assert local_registry(registry_root).champion() == "v0001", "runs after the registering test"
    before = {p: p.read_bytes() for p in registry_root.rglob("*") if p.is_file()}
    labels = np.array([3, 10, 4], dtype=np.uint8)
    write_idx_batch(stack.tmp / "data" / "incoming" / "bad", synthetic_images(labels % 10, seed=2), labels)

    run = deployment_run(stack, run_params)
    assert run["state_type"] == "FAILED"
    tasks = stack.filter("/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    states = {t["name"].rsplit("-", 1)[0]: t["state_type"] for t in tasks}
    # Screened as the batches are collected: refused before validation, training or registration.
    assert states["collect-incoming"] == "FAILED" and "validate" not in states and "register" not in states
    assert "refused: the run stops" in stack.artifacts(run["id"])["incoming-batches"]
    assert {p: p.read_bytes() for p in registry_root.rglob("*") if p.is_file()} == before
    failed = webhook.wait_for("fashion-mnist.run.failed", run["name"])
    assert "raw-incoming-bad: expect_column_values_to_be_between(column=label" in failed["text"], failed
    assert f"/runs/flow-run/{run['id']}" in failed["text"]


@pytest.mark.recovery
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


@contextmanager
def api_client(stack: Stack) -> Iterator:
    """This process's Prefect client and settings, pointed at the test's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api}), get_client(sync_client=True) as client:
        yield client


def unserved_deployment(client, name: str):
    """A deployment of the training flow in a pool no worker serves: its runs wait until told otherwise."""
    from prefect.client.schemas.actions import WorkPoolCreate

    client.create_work_pool(WorkPoolCreate(name="fashion-mnist-unattended", type="process"), overwrite=True)
    flow_id = client.create_flow_from_name("train-fashion-mnist")
    return client.create_deployment(
        flow_id=flow_id, name=name, work_pool_name="fashion-mnist-unattended", entrypoint="flows/train.py:train"
    )


@pytest.mark.recovery
def test_a_training_run_no_worker_takes_fails_the_wait_with_what_to_check(stack: Stack) -> None:
    with api_client(stack) as client:
        waiting = client.create_flow_run_from_deployment(unserved_deployment(client, "nobody-serves"))
        started = time.monotonic()
        with pytest.raises(TrainingRunSilent, match="no worker took it: check that a worker is running for work pool"):
            wait_for_run(waiting.id, silence_timeout_s=8)
        assert time.monotonic() - started < 60
        after = client.read_flow_run(waiting.id).state
        assert after.type.value == "CRASHED" and "fashion-mnist-unattended" in after.message


@pytest.fixture(scope="module")
def double_deployment(stack: Stack) -> str:
    """`tests/training_doubles.py` deployed on a pool of its own, with a process worker for it."""
    from prefect.client.schemas.actions import WorkPoolCreate

    with api_client(stack) as client:
        client.create_work_pool(WorkPoolCreate(name="fashion-mnist-doubles", type="process"), overwrite=True)
        client.create_deployment(
            flow_id=client.create_flow_from_name("training-double"),
            name="double",
            work_pool_name="fashion-mnist-doubles",
            entrypoint="tests/training_doubles.py:training_double",
            job_variables={"working_dir": str(ROOT)},
        )
    stack.start("worker-doubles", "worker", "start", "--pool", "fashion-mnist-doubles")
    return "training-double/double"


WAIT_ON_TRAINING = """
import json, sys
from prefect import flow
import flows.train
import fmnist.training.supervision
from fmnist.data.cache import CachedDataset, CachedPart
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.model import TrainParams

fmnist.training.supervision.POLL_S = 0.5
deployment, run_dir = sys.argv[1:]
part = CachedPart(run_dir + "/none.parquet", 1, "0" * 64)
cached = CachedDataset(key="k", train=[part], test=part, sources={})

@flow(name="waits-on-training")
def waits_on_training():
    return flows.train.train_on_deployment(
        deployment, cached, TrainParams(epochs=1), RunLayout(run_dir), StorageParams(), silence_timeout_s=300
    )

state = waits_on_training(return_state=True)
result = state.result(raise_on_failure=False)
print(json.dumps({
    "flow_run_id": str(state.state_details.flow_run_id),
    "completed": state.is_completed(),
    "resumed_at_epoch": getattr(result, "resumed_at_epoch", None),
    "error": f"{type(result).__name__}: {result}" if isinstance(result, BaseException) else None,
}))
"""


def wait_on_double(stack: Stack, deployment: str, run_dir: Path, plan: dict) -> tuple[dict, list[dict]]:
    """`train_on_deployment` in a flow run of its own process (so no Prefect client or event worker of this
    process is tied to this server), on the double told `plan`; how it ended, and the training runs."""
    run_dir.mkdir(parents=True)
    (run_dir / PLAN).write_text(json.dumps(plan))
    waited = subprocess.run(
        [sys.executable, "-c", WAIT_ON_TRAINING, deployment, str(run_dir)],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert waited.returncode == 0, waited.stderr[-3000:]
    outcome = json.loads(waited.stdout.strip().splitlines()[-1])
    return outcome, stack.child_runs(outcome["flow_run_id"], "double")


@pytest.mark.recovery
def test_a_training_run_that_crashes_twice_is_started_again_and_its_third_attempt_counts(
    stack: Stack, double_deployment: str, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    outcome, children = wait_on_double(stack, double_deployment, tmp_path / "run", {"crashes": 2})
    assert outcome["completed"], outcome["error"]
    assert outcome["resumed_at_epoch"] == 3  # the result the third attempt handed back
    assert [c["state_type"] for c in children] == ["CRASHED", "CRASHED", "COMPLETED"]
    parent = stack.get(f"/flow_runs/{outcome['flow_run_id']}")
    for attempt in (2, 3):
        webhook.wait_for("fashion-mnist.training.restarted", parent["name"], f"(attempt {attempt} of 3)")


@pytest.mark.recovery
def test_a_training_run_that_crashes_three_times_fails_the_wait(
    stack: Stack, double_deployment: str, tmp_path: Path
) -> None:
    outcome, children = wait_on_double(stack, double_deployment, tmp_path / "run", {"crashes": 3})
    assert not outcome["completed"]
    last = children[-1]["name"]
    assert re.match(
        rf"TrainingRunFailed: training run {last} \(.*\) on {double_deployment} ended Crashed", outcome["error"]
    )
    assert [c["state_type"] for c in children] == ["CRASHED"] * 3  # started again twice, not a fourth time


@pytest.mark.recovery
def test_a_training_run_that_fails_is_not_started_again(stack: Stack, double_deployment: str, tmp_path: Path) -> None:
    outcome, children = wait_on_double(stack, double_deployment, tmp_path / "run", {"fail": True})
    assert not outcome["completed"] and outcome["error"].startswith("TrainingRunFailed: ")
    assert re.search(r"ended Failed: .*the double failed on attempt 1, as planned", outcome["error"])
    assert [c["state_type"] for c in children] == ["FAILED"]  # a failure is not a crash: no second attempt


def test_new_batches_start_one_adhoc_run_after_they_stop_arriving(stack: Stack) -> None:
    data_root = stack.tmp / "data-batches"
    incoming = data_root / "incoming"
    cpu_pool = f"{stack.api}/work_pools/fashion-mnist-cpu"

    def pause_cpu_pool(paused: bool) -> None:
        def patched() -> bool:
            # A busy SQLite-backed server answers 503 now and then (database locked): try again.
            return httpx.patch(cpu_pool, json={"is_paused": paused}, timeout=30).is_success

        wait_for(f"the CPU pool {'paused' if paused else 'resumed'}", patched, timeout_s=60, every_s=2)

    # The triggered run is only counted, not run: its pool is paused, so it waits as Scheduled.
    pause_cpu_pool(True)
    triggered: list[dict] = []
    try:
        labels = np.array([3, 10, 4], dtype=np.uint8)
        bad = write_idx_batch(stack.tmp / "batches" / "bad", synthetic_images(labels % 10, seed=2), labels)
        refused = add_batch_cli(stack, bad, data_root)
        assert refused.returncode == 1 and "raw-incoming-bad: expect_column_values_to_be_between" in refused.stderr
        assert not incoming.exists() or not any(incoming.iterdir())

        good_labels = np.arange(30, dtype=np.uint8) % 10
        first = write_idx_batch(stack.tmp / "batches" / "b00", synthetic_images(good_labels, seed=0), good_labels)
        added = add_batch_cli(stack, first, data_root)
        assert added.returncode == 0 and "Announced it" in added.stdout, added.stdout + added.stderr
        # Nine more, DEBOUNCE_TEST_GAP_S later and in quick succession, through the same calls the CLI makes (a CLI
        # start costs seconds): the run must wait for the last of them, not start 60 s after the first.
        time.sleep(DEBOUNCE_TEST_GAP_S)
        storage = StorageParams(data_root=str(data_root), registry_root=str(stack.tmp / "artifacts-batches"))
        with api_client(stack):
            for i in range(1, 10):
                source = write_idx_batch(
                    stack.tmp / "batches" / f"b{i:02}", synthetic_images(good_labels, i), good_labels
                )
                asyncio.run(events.announce_batch(add_batch(Store(), source, storage.incoming), storage))
        assert len(collect_incoming(Store(), storage.incoming)) == 10

        def runs_for_these_batches() -> list[dict]:
            runs = stack.filter("/flow_runs/filter", {"deployments": {"name": {"any_": ["adhoc"]}}})
            return [r for r in runs if r["parameters"].get("storage", {}).get("incoming_dir") == str(incoming)]

        triggered = wait_for("a triggered ad-hoc run", runs_for_these_batches, timeout_s=150, every_s=2)
        time.sleep(5)  # the trigger fired and dropped its window: nothing else can start a run
        triggered = runs_for_these_batches()
        assert len(triggered) == 1, triggered
        assert triggered[0]["created_by"]["type"] == "AUTOMATION"
        assert triggered[0]["parameters"]["storage"]["registry_root"] == str(stack.tmp / "artifacts-batches")
        batch_events = stack.filter("/events/filter", {"filter": {"event": {"name": ["fashion-mnist.batch.added"]}}})
        assert {e["payload"]["batch"] for e in batch_events["events"]} == {f"b{i:02}" for i in range(10)}
        last_batch = max(datetime.fromisoformat(e["occurred"]) for e in batch_events["events"])
        created = datetime.fromisoformat(triggered[0]["created"])
        assert (created - last_batch).total_seconds() > 60 - 5, (created, last_batch)  # counted from the last
        # Nothing fired without a batch: a window kept open with no event once failed every minute.
        failed = stack.filter("/events/filter", {"filter": {"event": {"name": ["prefect.automation.action.failed"]}}})
        assert [e["payload"] for e in failed["events"] if e["payload"].get("action_type") == "run-deployment"] == []
    finally:
        for run in triggered:
            httpx.delete(f"{stack.api}/flow_runs/{run['id']}", timeout=30)
        pause_cpu_pool(False)


def add_batch_cli(stack: Stack, folder: Path, data_root: Path) -> subprocess.CompletedProcess:
    registry = stack.tmp / "artifacts-batches"
    return stack.cli("--registry", str(registry), "add-batch", str(folder), "--data-root", str(data_root))


@pytest.mark.slow  # two minutes of missed heartbeats, then a retrain: make test-slow (make test stays in its budget)
def test_a_lost_gpu_host_is_detected_and_the_run_completes_by_itself(stack: Stack) -> None:
    """The GPU worker and its training process die together during epoch 2 (a reclaimed spot host); the
    heartbeat automation marks the training run Crashed, the retraining run starts it again, and a new
    GPU worker resumes it after its last saved epoch."""
    epochs = 8
    spec = write_mirror(stack.tmp / "mirror-lost", train_per_class=100, test_per_class=10)
    params = {
        "mirrors": [str(stack.tmp / "mirror-lost")],
        "dataset": spec.model_dump(),
        # Small batches: epochs of a few seconds on 1,000 rows, long enough to lose the host in one.
        "training": {"epochs": epochs, "batch_size": 2, "steps_per_execution": 1},
        "promotion": {"min_accuracy": 0.5},
    }
    cli = start_deployment_run(stack, params, local_storage(stack, "-lost"))
    runs = stack.tmp / "artifacts-lost" / "runs"
    gpu_worker = next(p for p in stack.processes if "fashion-mnist-gpu" in p.args and p.poll() is None)

    def first_epoch_done() -> bool:
        histories = list(runs.glob("*/history.json"))
        return bool(histories) and len(json.loads(histories[0].read_text())["epochs"]) == 1

    wait_for("the end of epoch 1", first_epoch_done, timeout_s=300, every_s=0.05)
    children = subprocess.run(["pgrep", "-P", str(gpu_worker.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the training run's process"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(gpu_worker.pid, signal.SIGKILL)
    lost_at = time.monotonic()
    stack.start("worker-gpu-replacement", "worker", "start", "--pool", "fashion-mnist-gpu")

    run = stack.finished(cli, timeout_s=600)
    print(f"host lost to retraining run completed: {time.monotonic() - lost_at:.0f} s")
    assert run["state_type"] == "COMPLETED", run["state"]
    training = stack.child_runs(run["id"], "gpu")
    assert [r["state_type"] for r in training] == ["CRASHED", "COMPLETED"]
    assert "No heartbeat" in training[0]["state"]["message"]
    registry = local_registry(stack.tmp / "artifacts-lost")
    [version] = registry.versions()
    history = json.loads(registry.store.read_bytes(registry.file(version, "history.json").location))["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # each epoch exactly once


def test_a_late_heartbeat_cannot_crash_a_finished_run(stack: Stack) -> None:
    """A heartbeat sent just as a run completes opens the automation's window (prefect#18653); when it
    fires, its change to Crashed is not forced, and the server keeps the finished run as it was."""
    from prefect.states import Completed, Crashed, Running

    with api_client(stack) as client:
        run = client.create_flow_run_from_deployment(unserved_deployment(client, "late-heartbeat"))
        for state in (Running(), Completed()):
            client.set_flow_run_state(run.id, state, force=True)
        refused = client.set_flow_run_state(run.id, Crashed(message="No heartbeat"), force=False)
        assert refused.status.value != "ACCEPT"
        assert client.read_flow_run(run.id).state.type.value == "COMPLETED"


def test_a_rollout_started_is_judged_at_once_by_the_judge_deployment_and_a_worse_canary_rolled_back(
    stack: Stack, webhook: WebhookReceiver
) -> None:
    """The rollout.started event, as registration emits it, starts the judge deployment on the registry it
    names; on windows as servers write them (a canary worse on the two classes users send most), the judge
    rolls it back through the registry's records, reports it in the UI and tells the operator."""
    storage = StorageParams.model_validate(local_storage(stack, "-judge"))
    registry = Registry(Store(), storage.registry)
    versions = Versions(canary_swap_rate=0.1)
    live = versions.live(traffic(3000, SWAPPED, 0.8))
    roll_out(registry, versions, live)

    emitter = (
        "import sys; from fmnist.ops import events; from fmnist.storage.layout import StorageParams; "
        "from prefect.events.worker import EventsWorker; "
        "events.emit_rollout_started(StorageParams.model_validate_json(sys.argv[1]), 'v0002 made the canary', "
        "version='v0002'); EventsWorker.drain_all(timeout=30)"
    )
    subprocess.run([sys.executable, "-c", emitter, storage.model_dump_json()], env=stack.env, check=True, timeout=120)
    judge = stack.get("/deployments/name/judge-rollout/judge")

    def judged() -> dict | None:
        runs = stack.filter("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [judge["id"]]}}})
        return next((r for r in runs if r["state_type"] == "COMPLETED"), None)

    run = wait_for("the judge deployment's run", judged, timeout_s=240, every_s=2)
    assert run["parameters"]["storage"]["registry_root"] == storage.registry  # the event's registry
    assert registry.champion() == "v0001" and Rollouts(registry).record("v0002").outcome == "rolled_back"
    report = stack.artifacts(run["id"])
    assert (
        "v0002 rolled back" in report["rollout-report"]
        and "accuracy under the live class mix" in report["rollout-report"]
    )
    webhook.wait_for(events.ROLLOUT_ROLLED_BACK, "v0002")


def test_the_watch_deployment_says_when_the_champions_traffic_drifted(stack: Stack, webhook: WebhookReceiver) -> None:
    """Two hours of the champion's traffic, the second far harder than its test set (as servers write it):
    the watch deployment's run tells the operator, with the periods in the UI."""
    storage = StorageParams.model_validate(local_storage(stack, "-watch"))
    registry = Registry(Store(), storage.registry)
    versions = Versions()
    register(registry, 0.9, versions.offline.stable_calibration, versions.offline.stable_predictions, "immediate")
    for hours_ago, accuracy in ((2.5, 0.9), (1.5, 0.9), (0.5, 0.55)):
        labels = traffic(2000, seed=int(hours_ago * 10))
        write_windows(registry, "v0001", "stable", "served", totals(answers(labels, 31, accuracy)), hours_ago * 3600)
    watch = {"period_s": 3600, "drifted_periods": 1, "lookback_s": 4 * 3600}
    run = stack.finished(stack.deployment_run("watch-champion/watch", watch=watch, storage=storage.model_dump()))
    assert run["state_type"] == "COMPLETED", run["state"]
    report = stack.artifacts(run["id"])
    assert "Champion v0001: input drift" in report["champion-watch"], report
    webhook.wait_for(events.CHAMPION_DRIFTED, "v0001")
