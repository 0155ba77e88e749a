"""A Prefect process worker that, stopped politely, hands its runs back, and stops in bounded time.

`prefect worker start` stopped with SIGTERM (`systemctl stop`, a spot-instance notice) or Ctrl-C stops the
flow-run processes it started, and leaves their runs Running on the server (prefect#16746): the work
pool's slot stays taken, and nothing resumes the run until the heartbeat watch gives up on it (three
heartbeats: minutes). `fashion-mnist worker` runs the same worker as a child; when it is told to stop, it
notes the flow-run processes the worker started, lets the worker stop them, makes sure they are gone,
and marks their runs Crashed with a message saying so. The retraining flow then starts each again
(`fmnist.training.supervision`), and another worker resumes it from its last saved epoch.

A run is known by the id its own process carries (`PREFECT__FLOW_RUN_ID`, which Prefect's worker puts in
the environment of each flow-run process it starts), read from that process on this host: never by the
PID the server records, which another host's process may share. And the stop is bounded: Prefect's
worker can hang on its way out (its cancellation observer, with the API away), so it is killed after
its grace, and the hand-back gets what is left of `WORKER_STOP_S`; the runs it could not hand back are
named, for the heartbeat watch to crash later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# A stopped worker (SIGTERM or SIGINT) has exited this long after it was told to, whatever the API's
# state: under systemd's default stop timeout (90 s) and a spot notice's two minutes.
WORKER_STOP_S = 75
# The last part of it, for marking the stopped runs Crashed; before it, Prefect's worker stops its
# flow-run processes (its own grace for one is 30 s), and whatever is left is killed here.
HAND_BACK_S = 20
# States a stopped worker's runs may be left in: started on this worker, not finished.
UNFINISHED = ("RUNNING", "PENDING", "CANCELLING")
# The variable Prefect's worker sets in each flow-run process it starts: the run's id.
RUN_ID_VARIABLE = b"PREFECT__FLOW_RUN_ID"
# Server errors the worker's client retries besides 429, 502 and 503 (an operator's setting wins). A
# Prefect server that cannot reach its PostgreSQL answers 500: without a retry, a worker meeting a
# database restart could not mark the run whose process failed Crashed, and it stayed Pending, holding
# its deployment's slot for good. prefect.yaml sets the same for the flow runs.
RETRIED_SERVER_ERRORS = "500"


@dataclass(frozen=True)
class Process:
    """A process on this host: its PID, when it started (with the PID, one process ever), and the flow
    run it runs, if its environment names one."""

    pid: int
    started: int
    run_id: str | None


def _stat(pid: int, proc: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after its name: state, ppid, ... (None if it is gone)."""
    try:
        # pid (comm) state ppid ...: comm is any bytes (another user's process may name itself in
        # anything, not UTF-8 too), with spaces and parentheses; the last ')' ends it.
        return (proc / str(pid) / "stat").read_bytes().rsplit(b")", 1)[1].decode("ascii", "replace").split()
    except (OSError, IndexError, ValueError):
        return None


def _parents(proc: Path) -> dict[int, int]:
    """Each process's parent, now."""
    parents = {}
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(ValueError, IndexError):
            if (fields := _stat(int(stat.parent.name), proc)) is not None:
                parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Every process below `pid` now (Linux: read from /proc)."""
    return set(_below(pid, _parents(proc)))


def _below(pid: int, parents: dict[int, int]) -> dict[int, int]:
    """The processes below `pid`, each with its parent."""
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child in children.get(parent, []):
            if child not in found:
                found[child] = parent
                todo.append(child)
    return found


def process(pid: int, proc: Path = Path("/proc")) -> Process | None:
    """The process `pid` now, with the flow run its environment names (None if it is gone)."""
    fields = _stat(pid, proc)
    if fields is None:
        return None
    run_id = None
    with contextlib.suppress(OSError):  # gone meanwhile, or another user's
        for entry in (proc / str(pid) / "environ").read_bytes().split(b"\0"):
            name, _, value = entry.partition(b"=")
            if name == RUN_ID_VARIABLE:  # the first, as the process's own getenv reads it
                run_id = value.decode(errors="replace")
                break
    return Process(pid, int(fields[19]), run_id)  # field 22 of stat: start time, in clock ticks


def processes_below(pid: int, proc: Path = Path("/proc")) -> dict[int, Process]:
    """The processes below `pid` (Prefect's worker), each with the run it belongs to: the run its topmost
    ancestor below the worker names, the process the worker started. What a process further down names is
    not believed: a flow run's own children may set the variable to anything."""
    below = _below(pid, _parents(proc))
    found = {p.pid: p for child in below if (p := process(child, proc)) is not None}
    owned = {}
    for child, noted in found.items():
        top, parent = noted, below[child]
        while parent != pid and parent in found:
            top, parent = found[parent] if found[parent].run_id else top, below[parent]
        owned[child] = noted if top is noted else Process(noted.pid, noted.started, top.run_id)
    return owned


def keeping_run_ids(before: dict[int, Process], now: dict[int, Process]) -> dict[int, Process]:
    """The processes `now`, each with the run id noted `before` for the same process (PID and start time)
    where its environment names none now: a process on its way out has none to read (the kernel has
    released its memory while /proc still lists it), and a stop races with it (Prefect's worker, told by
    the same `systemctl stop`, is stopping its runs as they are noted)."""
    kept = {}
    for pid, found in now.items():
        noted = before.get(pid)
        if noted is not None and noted.started == found.started and noted.run_id is not None:
            found = noted  # the id first noted stays: a process that execs with another names no other run
        kept[pid] = found
    return kept


def alive(noted: Process, proc: Path = Path("/proc")) -> bool:
    """Whether the process noted is still there: its PID, not reused by another since."""
    now = _stat(noted.pid, proc)
    return now is not None and int(now[19]) == noted.started and now[0] != "Z"


def run_worker(pool: str, extra: list[str], stop_within_s: float = WORKER_STOP_S) -> int:
    """Run `prefect worker start --pool POOL EXTRA...`; on SIGTERM or SIGINT, stop it and hand its runs
    back, and exit within `stop_within_s` of the first signal whatever the API's state."""
    os.environ.setdefault("PREFECT_CLIENT_RETRY_EXTRA_CODES", RETRIED_SERVER_ERRORS)  # the worker's, and hand_back's
    prefect = str(Path(sys.executable).parent / "prefect")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", pool, *extra])
    asked: list[tuple[int, float]] = []
    last: dict[int, Process] = {}
    started: dict[int, Process] = {}  # the processes the worker had started when told to stop: its runs'

    def stop(signum: int, _frame: object) -> None:
        if not asked:
            asked.append((signum, time.monotonic()))
            # The bound, whatever takes long below (thousands of processes to note, an API away).
            watchdog = threading.Timer(stop_within_s, out_of_time, args=(pool, signal.Signals(signum).name))
            watchdog.daemon = True
            watchdog.start()
            started.update(keeping_run_ids(last, processes_below(worker.pid)))
        worker.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while worker.poll() is None and not asked:
        # Noted as it goes too: a stop that signals the worker with this process (systemd, a process
        # group) may find its runs already being stopped.
        last = keeping_run_ids(last, processes_below(worker.pid))
        time.sleep(1)
    if not asked:
        return worker.returncode
    signum, asked_at = asked[0]
    why = signal.Signals(signum).name
    started = {**last, **keeping_run_ids(last, started)}
    hand_back_s = min(HAND_BACK_S, stop_within_s / 3)
    grace_end = asked_at + stop_within_s - hand_back_s
    while worker.poll() is None and time.monotonic() < grace_end:
        started.update(keeping_run_ids(started, processes_below(worker.pid)))
        time.sleep(0.2)
    if worker.poll() is None:
        started.update(keeping_run_ids(started, processes_below(worker.pid)))
        worker.kill()
        worker.wait()
        say(f"Prefect's worker for {pool} had not stopped {stop_within_s - hand_back_s:.0f} s after {why}: killed")
    while any(alive(p) for p in started.values()) and time.monotonic() < grace_end:
        time.sleep(0.2)
    for noted in started.values():
        if alive(noted):  # a run must be gone before it is handed on: two processes would write its folder
            with contextlib.suppress(ProcessLookupError):
                os.kill(noted.pid, signal.SIGKILL)
    runs: dict[str, set[int]] = {}
    for noted in started.values():
        if noted.run_id:
            runs.setdefault(noted.run_id, set()).add(noted.pid)
    return hand_back_within(pool, runs, why, deadline=asked_at + stop_within_s)


def out_of_time(pool: str, why: str) -> None:
    say(
        f"worker for {pool} stopped ({why}) without handing its runs back in time: the heartbeat watch "
        "marks them Crashed once their heartbeats are missed"
    )
    os._exit(1)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def hand_back_within(pool: str, runs: dict[str, set[int]], why: str, deadline: float) -> int:
    """`hand_back`, given until `deadline` (monotonic): 0 if it answered, else 1, naming the runs left."""
    if not runs:
        say(f"worker for {pool} stopped ({why}); it was running no flow run")
        return 0
    outcome: list = []

    def attempt() -> None:
        try:
            outcome.append(hand_back(pool, runs, why))
        except Exception as exc:  # the API may be down too
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="hand-back", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    listed = ", ".join(f"{run_id} (process {min(pids)})" for run_id, pids in runs.items())
    if not outcome or isinstance(outcome[0], Exception):
        cause = f"{outcome[0]!r}" if outcome else "the Prefect API did not answer in time"
        say(
            f"worker for {pool} stopped ({why}); could not hand back its runs {listed} ({cause}): "
            "the heartbeat watch marks them Crashed once their heartbeats are missed"
        )
        if not outcome:  # the hand-back is still waiting on the API: end without it, within the bound
            sys.stdout.flush()
            os._exit(1)
        return 1
    handed = outcome[0]
    say(f"worker for {pool} stopped ({why}); runs handed back: {', '.join(handed) or 'none'} (of {listed})")
    return 0


def hand_back(pool: str, runs: dict[str, set[int]], why: str) -> list[str]:
    """Mark Crashed the unfinished runs of `pool` among `runs` (run id: the PIDs of its processes on this
    host, now gone): their names. A run is passed over if the server records another process for it (it
    was started again elsewhere). Not forced: a run that finished meanwhile stays as it is."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    handed = []
    with get_client(sync_client=True) as client:
        for run_id, pids in runs.items():
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:
                continue
            if run.work_pool_name != pool or not run.state or run.state.type.value not in UNFINISHED:
                continue
            host, _, recorded = (run.infrastructure_pid or "").rpartition(":")
            if host and host != socket.gethostname():
                continue  # the server has it on another host: started again there since
            if recorded and recorded not in {str(pid) for pid in pids}:
                continue  # the server has it on another process: started again elsewhere since
            message = (
                f"its worker on {socket.gethostname()} was stopped ({why}); the run's process "
                f"{recorded or min(pids)} is gone"
            )
            result = client.set_flow_run_state(run.id, Crashed(message=message), force=False)
            if result.status.value == "ACCEPT":
                handed.append(run.name)
    return handed
