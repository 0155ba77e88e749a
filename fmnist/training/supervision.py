"""Supervising a training run on another host: submit it, wait for it, start it again after a crash,
give up with what to check.

Nobody watches a nightly run, so the retraining flow never waits on a training run forever:
- a training run that crashed (its process died; or its host was lost, and the heartbeat automation
  of `automations.yaml` marked it Crashed) is started again, `CRASH_RESUBMISSIONS` times at most, and
  resumes after its last saved epoch on whichever GPU worker takes it;
- a training run that shows no sign of life (no heartbeat, no state change) for `silence_timeout_s`
  is marked Crashed, which frees its concurrency slots, and the wait fails with what to check;
- a run that failed (its code raised) is not started again: it would fail the same way;
- the Prefect API not answering (a server restart, an upgrade, its database down) is waited out, for
  `silence_timeout_s` at most: the training run goes on without the server, and so does the wait.

A run marked Crashed before it started (the start watch of `automations.yaml`, or the silence above)
may still start late: Prefect accepts Running from Crashed, and the deployment's one slot is not
taken again. The training flow refuses to go on in such a run (`check_never_ended`), before it
trains or writes.

A server away for longer than the heartbeat automation's window marks every run it hears nothing from
Crashed when it is back, the live ones too (their heartbeats went nowhere). Then the retraining run,
alive and waiting, takes itself back to Running (`take_back`); the training run stops at its next
epoch, before it saves (`check_still_running`), and is started again in its place like any crashed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from uuid import UUID

import httpx

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun, State

# A training run that crashed is started again, twice at most: enough for a reclaimed spot host and
# an OOM kill in one night, not a loop on a run that cannot succeed.
CRASH_RESUBMISSIONS = 2
POLL_S = 5.0

log = logging.getLogger(__name__)


class TrainingRunFailed(RuntimeError):
    """The training flow run on the training deployment did not complete."""


class TrainingRunSilent(TrainingRunFailed):
    """The training flow run showed no sign of life for longer than allowed."""


class TrainingRunSuperseded(RuntimeError):
    """This training run was ended (marked Crashed or Cancelled) by someone else while it still ran."""


def api_unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the Prefect API is away (no connection, or a 5xx from it or a proxy) rather
    than that a request was wrong. Prefect's client has already retried it, about a minute."""
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, PrefectHTTPStatusError | httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError | ConnectionError)


def check_still_running(client: SyncPrefectClient, run_id: UUID) -> None:
    """Raise `TrainingRunSuperseded` if the flow run `run_id` has been moved to a final state."""
    run = client.read_flow_run(run_id)
    if run.state and run.state.is_final():
        raise TrainingRunSuperseded(
            f"training run {run.name} ({run_id}) was marked {run.state.name} while it still ran "
            f"({run.state.message or 'no message'}); it stops here, before saving this epoch, so that the run "
            "started in its place trains alone"
        )


def check_never_ended(client: SyncPrefectClient, run_id: UUID | str) -> None:
    """Raise `TrainingRunSuperseded` if the flow run `run_id`, starting now, was ever ended (marked Crashed,
    Cancelled, Failed...): a run declared dead whose process starts late (Prefect accepts Running from
    Crashed) would train beside the run started in its place, into the same run folder."""
    run = client.read_flow_run(run_id)
    ended = [state for state in client.read_flow_run_states(run_id) if state.is_final()]
    if run.state and run.state.is_final():
        ended.append(run.state)
    if ended:
        last = max(ended, key=lambda state: state.timestamp)
        raise TrainingRunSuperseded(
            f"training run {run.name} ({run_id}) was marked {last.name} at {last.timestamp:%Y-%m-%d %H:%M:%S} "
            f"UTC ({last.message or 'no message'}) before this process started it; it stops here, before it "
            "trains or writes, so that the run started in its place trains alone. Nothing to do: the "
            "retraining run waits for that one (to train again, make retrain-now)"
        )


def fence_late_start(run_id: UUID | str) -> None:
    """`check_never_ended` for the flow run `run_id`, with a client of its own: the first thing a training run does."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        check_never_ended(client, run_id)


def last_sign_of_life(client: SyncPrefectClient, run: FlowRun) -> datetime:
    """When the run last showed it was alive: its newest event (heartbeat or state change), or state."""
    from prefect.events.filters import EventFilter, EventOccurredFilter, EventResourceFilter

    times = [run.created or datetime.now(UTC)]
    if run.state and run.state.timestamp:
        times.append(run.state.timestamp)
    newest = client.read_events(
        EventFilter(
            occurred=EventOccurredFilter(since=times[0]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run.id}"]),
        ),
        limit=1,
    ).events
    times += [event.occurred for event in newest]
    return max(times)


def silence_message(run: FlowRun, silent_s: float) -> str:
    """What to check about a run silent for `silent_s`: a worker for its pool if none took it, else its host."""
    state = run.state.name if run.state else "no state"
    if run.state and (run.state.is_scheduled() or run.state.is_pending()):
        return (
            f"training run {run.name} ({run.id}) waited {silent_s:.0f} s in state {state} and no worker took it: "
            f"check that a worker is running for work pool {run.work_pool_name} (make worker-gpu) and that the "
            "pool and the deployment are not paused or full"
        )
    return (
        f"training run {run.name} ({run.id}) has been {state} without a heartbeat or state change for "
        f"{silent_s:.0f} s: its host or worker is probably lost. Check the GPU worker's host, and that "
        "make deploy created the heartbeat automation (prefect automation ls); the run was marked Crashed "
        "so that it frees its slots"
    )


def take_back(client: SyncPrefectClient, run_id: UUID, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """If the flow run `run_id`, whose process calls this, was marked Crashed, move it back to Running."""
    from prefect.states import Running

    run = client.read_flow_run(run_id)
    if run.state and run.state.is_crashed():
        message = (
            f"Back to Running: this run was marked Crashed ({run.state.message or 'no message'}) while its "
            "process still ran"
        )
        client.set_flow_run_state(run_id, Running(message=message), force=True)
        logger.warning(message)


def wait_for_run(
    run_id: UUID,
    silence_timeout_s: float,
    waiter: UUID | None = None,
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> FlowRun:
    """Wait until the flow run ends; raise `TrainingRunSilent` (after marking it Crashed) if it goes
    silent, or `TrainingRunFailed` if the API has not answered for `silence_timeout_s`. `waiter`: the
    flow run that waits (it is taken back if it was marked Crashed meanwhile)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        away_since: float | None = None
        while True:
            try:
                if waiter:
                    take_back(client, waiter, logger)
                run = client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    return run
                silent_s = (datetime.now(UTC) - last_sign_of_life(client, run)).total_seconds()
                if silent_s > silence_timeout_s:
                    message = silence_message(run, silent_s)
                    client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                    raise TrainingRunSilent(message)
            except Exception as exc:
                if not api_unreachable(exc):
                    raise
                away_since = away_since or time.monotonic()
                away_s = time.monotonic() - away_since
                if away_s > silence_timeout_s:
                    raise TrainingRunFailed(
                        f"the Prefect API at {client.api_url} has not answered for {away_s:.0f} s ({exc!r}); "
                        f"training run {run_id} may still be running: check the server, then the run"
                    ) from exc
                logger.warning(
                    "The Prefect API at %s is not answering (%r) after Prefect's retries; still waiting for "
                    "training run %s (%.0f s of %.0f s)",
                    client.api_url,
                    exc,
                    run_id,
                    away_s,
                    silence_timeout_s,
                )
            else:
                if away_since is not None:
                    logger.info("The Prefect API answers again after %.0f s", time.monotonic() - away_since)
                away_since = None
            time.sleep(POLL_S)


def restartable(state: State) -> bool:
    """Whether a training run that ended in `state` is started again: it crashed, or it stopped on
    finding itself marked Crashed while it still ran (Failed, naming `TrainingRunSuperseded`)."""
    superseded = state.is_failed() and f"{TrainingRunSuperseded.__name__}:" in (state.message or "")
    return state.is_crashed() or superseded


def supervise(
    submit: Callable[[], UUID],
    wait: Callable[[UUID], FlowRun],
    where: str,
    on_restart: Callable[[FlowRun, str], None],
) -> FlowRun:
    """Submit a training run and wait for it; after a crash, tell `on_restart` why and submit it again.

    Returns the completed run; raises TrainingRunFailed naming the last run, where it ran (`where`)
    and how it ended, once a run fails, ends otherwise, or crashes `CRASH_RESUBMISSIONS + 1` times.
    """
    attempts = CRASH_RESUBMISSIONS + 1
    attempt = 1
    while True:
        run = wait(submit())
        state = run.state
        if state is not None and state.is_completed():
            return run
        if state is None or not restartable(state) or attempt == attempts:
            raise TrainingRunFailed(
                f"training run {run.name} ({run.id}) on {where} ended "
                f"{state.name if state else 'without a state'}: {state.message if state else ''}"
            )
        on_restart(
            run,
            f"Training run {run.name} crashed ({state.message}); starting it again "
            f"(attempt {attempt + 1} of {attempts}), to resume after its last saved epoch",
        )
        attempt += 1
