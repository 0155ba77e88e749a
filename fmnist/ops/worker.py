"""A Prefect process worker that, stopped politely, hands its runs back.

`prefect worker start` stopped with SIGTERM (`systemctl stop`, a spot-instance notice) or Ctrl-C stops the
flow-run processes it started, and leaves their runs Running on the server (prefect#16746): the work
pool's slot stays taken, and nothing resumes the run until the heartbeat watch gives up on it (three
heartbeats: minutes). `fashion-mnist worker` runs the same worker as a child; when it is told to stop, it
notes the flow-run processes the worker started, lets the worker stop them, makes sure they are gone,
and marks their runs Crashed with a message saying so. The retraining flow then starts each again
(`fmnist.training.supervision`), and another worker resumes it from its last saved epoch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# How long the worker has to stop its runs after it is told to, before they are killed here. Prefect's
# own grace for a flow-run process is 30 s; a spot notice gives two minutes for all of it.
WORKER_STOP_GRACE_S = 45
# States a stopped worker's runs may be left in: started on this worker, not finished.
UNFINISHED = ("RUNNING", "PENDING", "CANCELLING")
# Server errors the worker's client retries besides 429, 502 and 503 (an operator's setting wins). A
# Prefect server that cannot reach its PostgreSQL answers 500: without a retry, a worker meeting a
# database restart could not mark the run whose process failed Crashed, and it stayed Pending, holding
# its deployment's slot for good. prefect.yaml sets the same for the flow runs.
RETRIED_SERVER_ERRORS = "500"


def descendants(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Every process below `pid` now (Linux: read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces and parentheses; the last ')' ends it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_worker(pool: str, extra: list[str], grace_s: float = WORKER_STOP_GRACE_S) -> int:
    """Run `prefect worker start --pool POOL EXTRA...`; on SIGTERM or SIGINT, stop it and hand its runs back."""
    os.environ.setdefault("PREFECT_CLIENT_RETRY_EXTRA_CODES", RETRIED_SERVER_ERRORS)  # the worker's, and hand_back's
    prefect = str(Path(sys.executable).parent / "prefect")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", pool, *extra])
    asked: list[int] = []
    last: set[int] = set()
    started: set[int] = set()  # the processes the worker had started when told to stop: its runs among them

    def stop(signum: int, _frame: object) -> None:
        if not asked:
            asked.append(signum)
            started.update(descendants(worker.pid))
        worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while worker.poll() is None:
        # Noted as it goes too: a stop that signals the worker with this process (systemd, a process
        # group) may find its runs already being stopped.
        if not asked:
            last = descendants(worker.pid)
        time.sleep(1)
    if not asked:
        return worker.returncode
    started.update(last)
    why = signal.Signals(asked[0]).name
    deadline = time.monotonic() + grace_s
    while any(alive(pid) for pid in started) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in started:
        if alive(pid):  # a run must be gone before it is handed on: two processes would write its folder
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    try:
        handed = hand_back(pool, started, why)
    except Exception as exc:  # the API may be down too; the heartbeat watch crashes them later
        print(f"worker for {pool} stopped ({why}); could not hand its runs back ({exc}): the heartbeat watch will")
        return 1
    print(f"worker for {pool} stopped ({why}); runs handed back: {', '.join(handed) or 'none'}", flush=True)
    return 0


def hand_back(pool: str, pids: set[int], why: str) -> list[str]:
    """Mark Crashed the unfinished runs of `pool` whose process was one of `pids` (on this host): their
    names. Not forced: a run that finished meanwhile stays as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    handed = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in UNFINISHED]))
            ),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
        for run in runs:
            if not run.infrastructure_pid or not run.infrastructure_pid.split(":")[-1].isdigit():
                continue
            if int(run.infrastructure_pid.split(":")[-1]) not in pids:
                continue
            message = f"its worker on {socket.gethostname()} was stopped ({why}); the run's process is gone"
            result = client.set_flow_run_state(run.id, Crashed(message=message), force=False)
            if result.status.value == "ACCEPT":
                handed.append(run.name)
    return handed
