"""Supervising a training run (`fmnist.training.supervision`): the decisions, on Prefect's own run and
state records, without a server. The end-to-end tests (`test_e2e.py`) run the same code against a real
server, worker and deployment."""

from __future__ import annotations

import uuid

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelled, Completed, Crashed, Failed, Pending, Running

from fmnist.training.supervision import CRASH_RESUBMISSIONS, TrainingRunFailed, silence_message, supervise


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
