"""How `fashion-mnist worker` knows the flow runs below it, from /proc, against processes that lie or
misbehave: real child processes, no Prefect."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmnist.ops.worker import descendants, keeping_run_ids, process, processes_below

RUN_A, RUN_B = "aaaaaaaa-0000-0000-0000-000000000000", "bbbbbbbb-0000-0000-0000-000000000000"


@contextmanager
def started(code: str, env: dict[str, str] | None = None, **popen) -> Iterator[subprocess.Popen]:
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})}, **popen)
    try:
        time.sleep(0.6)  # it has started, and done what it does first
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_process_named_in_bytes_that_are_not_utf8_stops_no_noting() -> None:
    """Any process on the host, of any user, could end the worker's noting (and its runs' hand-back)."""
    renamed = (
        "import ctypes, time; ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b'bad\\xff\\xfe'), 0, 0, 0); time.sleep(30)"
    )
    with started(renamed, start_new_session=True) as stranger, started("import time; time.sleep(30)") as mine:
        assert Path(f"/proc/{stranger.pid}/comm").read_bytes().startswith(b"bad\xff")
        assert mine.pid in processes_below(os.getpid())


def test_only_the_process_the_worker_started_names_its_run() -> None:
    """A flow run's own child naming another run had that run handed back."""
    forging = (
        "import os, subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'], env={{**os.environ, "
        f"'PREFECT__FLOW_RUN_ID': '{RUN_B}'}}); time.sleep(30)"
    )
    with started(forging, {"PREFECT__FLOW_RUN_ID": RUN_A}) as run:
        below = processes_below(os.getpid())  # this process's other children (servers of other tests) aside:
        ours = {pid: p for pid, p in below.items() if pid == run.pid or pid in descendants(run.pid)}
        assert len(ours) == 2  # the run, and its forging child, noted to be killed with it
        assert {p.run_id for p in ours.values()} == {RUN_A}


def test_a_run_id_first_noted_stays_and_the_first_of_two_is_read() -> None:
    """A process that execs with another id, or holds the variable twice, was handed back as another run."""
    twice = (  # execve(2) itself: Python's takes a mapping, which cannot hold a name twice
        "import ctypes, sys; libc = ctypes.CDLL(None); strings = lambda *items: (ctypes.c_char_p * (len(items) + 1))"
        "(*items, None); libc.execve(sys.executable.encode(), strings(sys.executable.encode(), b'-c', "
        f"b'import time; time.sleep(30)'), strings(b'PREFECT__FLOW_RUN_ID={RUN_A}', b'PREFECT__FLOW_RUN_ID={RUN_B}'))"
    )
    with started(twice) as run:
        noted = process(run.pid)
        assert noted.run_id == RUN_A  # as the process's own getenv reads it
        changed = noted.__class__(noted.pid, noted.started, RUN_B)  # as after an exec with another environment
        assert keeping_run_ids({run.pid: noted}, {run.pid: changed})[run.pid].run_id == RUN_A
