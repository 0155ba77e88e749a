"""Supervising a training run (`fmnist.training.supervision`): the decisions, on Prefect's own run and
state records, without a server. The end-to-end tests (`test_e2e.py`) run the same code against a real
server, worker and deployment."""

from __future__ import annotations

import logging
import uuid

import httpx
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Running

from fmnist.training.supervision import (
    CRASH_RESUBMISSIONS,
    TrainingRunFailed,
    TrainingRunSuperseded,
    api_unreachable,
    check_still_running,
    silence_message,
    supervise,
    take_back,
)


def flow_run(state, name: str) -> FlowRun:
    return FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name=name, state=state, work_pool_name="gpu-pool")


class Deployment:
    """Runs that end as planned, one per submission, and what the supervisor was told."""

    def __init__(self, *states) -> None:
        self.planned = list(states)
        self.runs: dict[uuid.UUID, FlowRun] = {}
        self.restarts: list[tuple[str, str]] = []

    def submit(self) -> uuid.UUID:
        run = flow_run(self.planned.pop(0), f"run-{len(self.runs) + 1}")
        self.runs[run.id] = run
        return run.id

    def wait(self, run_id: uuid.UUID) -> FlowRun:
        return self.runs[run_id]

    def supervise(self) -> FlowRun:
        return supervise(
            self.submit, self.wait, "train/gpu", on_restart=lambda run, why: self.restarts.append((run.name, why))
        )


def test_a_run_that_crashes_is_started_again_until_one_completes() -> None:
    deployment = Deployment(Crashed(message="host lost"), Crashed(message="OOM"), Completed())
    assert deployment.supervise().name == "run-3"
    assert [name for name, _ in deployment.restarts] == ["run-1", "run-2"]
    assert "crashed (host lost); starting it again (attempt 2 of 3)" in deployment.restarts[0][1]
    assert "crashed (OOM); starting it again (attempt 3 of 3)" in deployment.restarts[1][1]


def test_a_run_that_stopped_because_it_had_been_marked_crashed_is_started_again() -> None:
    """The heartbeat automation crashed it while the server was away; it stopped at its next epoch."""
    superseded = Failed(message="Flow run encountered an exception: TrainingRunSuperseded: training run x ...")
    deployment = Deployment(superseded, Completed())
    assert deployment.supervise().name == "run-2"
    assert [name for name, _ in deployment.restarts] == ["run-1"]


def test_crashes_beyond_the_resubmissions_fail_naming_the_last_run() -> None:
    deployment = Deployment(*[Crashed(message="host lost")] * (CRASH_RESUBMISSIONS + 2))
    with pytest.raises(TrainingRunFailed, match=r"training run run-3 \(.*\) on train/gpu ended Crashed: host lost"):
        deployment.supervise()
    assert len(deployment.runs) == CRASH_RESUBMISSIONS + 1 and len(deployment.planned) == 1  # no fourth


@pytest.mark.parametrize("state", [Failed(message="ValueError: bad"), Cancelled(message="by an operator")])
def test_a_run_that_fails_or_is_cancelled_is_not_started_again(state) -> None:
    deployment = Deployment(state, Completed())
    with pytest.raises(TrainingRunFailed, match=rf"run-1 \(.*\) on train/gpu ended {state.name}"):
        deployment.supervise()
    assert deployment.restarts == [] and len(deployment.runs) == 1


def test_a_silent_run_says_what_to_check() -> None:
    waiting = silence_message(flow_run(Pending(), "queued"), 61.4)
    assert "waited 61 s in state Pending and no worker took it" in waiting and "work pool gpu-pool" in waiting
    lost = silence_message(flow_run(Running(), "lost"), 1800)
    assert "has been Running without a heartbeat or state change for 1800 s" in lost
    assert "heartbeat automation" in lost and "no worker took it" not in lost


def status_error(code: int) -> PrefectHTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1:4200/api/flow_runs/x")
    return PrefectHTTPStatusError.from_httpx_error(
        httpx.HTTPStatusError("", request=request, response=httpx.Response(code, request=request))
    )


def test_only_an_absent_or_failing_api_counts_as_unreachable() -> None:
    """What the wait and the epoch report sit out: no connection, or a 5xx (a restarting server, its
    database away). A 4xx is a wrong request, and a bug in the code is a bug: both are raised."""
    assert api_unreachable(httpx.ConnectError("All connection attempts failed"))
    assert api_unreachable(httpx.ReadTimeout("timed out"))
    assert api_unreachable(status_error(503)) and api_unreachable(status_error(500))
    assert not api_unreachable(status_error(404)) and not api_unreachable(status_error(422))
    assert not api_unreachable(ObjectNotFound(http_exc=status_error(404)))
    assert not api_unreachable(KeyError("loss"))
    assert api_unreachable(ConnectionRefusedError(111, "Connection refused"))
    assert not api_unreachable(FileNotFoundError("model.keras"))  # a local error, not the API


class Runs:
    """Prefect's client, as far as `check_still_running` reads it: one run in one state."""

    def __init__(self, state) -> None:
        self.run = flow_run(state, "training")

    def read_flow_run(self, run_id: uuid.UUID) -> FlowRun:
        assert run_id == self.run.id
        return self.run

    def set_flow_run_state(self, run_id: uuid.UUID, state, force: bool = False) -> None:
        assert run_id == self.run.id and force
        self.run.state = state


def test_a_training_run_ended_while_it_ran_stops_and_says_why() -> None:
    running = Runs(Running())
    check_still_running(running, running.run.id)  # still its own: goes on
    for state in (Crashed(message="No heartbeat for 90 s"), Cancelled(message="by an operator")):
        ended = Runs(state)
        with pytest.raises(
            TrainingRunSuperseded, match=rf"was marked {state.name} while it still ran \({state.message}\)"
        ):
            check_still_running(ended, ended.run.id)


def test_a_live_retraining_run_marked_crashed_takes_itself_back(caplog: pytest.LogCaptureFixture) -> None:
    runs = Runs(Crashed(message="No heartbeat for 90 s: the run's host or worker was lost"))
    take_back(runs, runs.run.id, logging.getLogger("test"))
    assert runs.run.state.is_running()
    assert "was marked Crashed (No heartbeat for 90 s" in runs.run.state.message
    assert "Back to Running" in caplog.text
    for state in (Running(), Cancelled(message="by an operator"), Completed()):  # left as they are
        runs = Runs(state)
        take_back(runs, runs.run.id, logging.getLogger("test"))
        assert runs.run.state is state
