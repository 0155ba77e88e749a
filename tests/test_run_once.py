"""`make run`'s entry point (`python -m flows.run_once`) as a process of its own: it starts its own Prefect
server, trains on a first run, and on a run that finds nothing changed imports neither TensorFlow nor GX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, write_mirror

pytestmark = pytest.mark.training

# Runs the entry point, then reports which heavy libraries the process imported.
RUN_AND_REPORT = (
    "import json, runpy, sys; runpy.run_module('flows.run_once', run_name='__main__'); "
    "heavy = ('tensorflow', 'keras', 'great_expectations'); "
    "print('IMPORTED', json.dumps(sorted(m for m in heavy if m in sys.modules)))"
)


def run_once(cwd: Path, params: dict, **env_vars: str) -> tuple[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # no server given: it starts one
    env.update(PREFECT_HOME=str(cwd / ".prefect"), PYTHONPATH=str(ROOT), **env_vars)
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, "--params", json.dumps(params)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    imported = json.loads(done.stdout.split("IMPORTED ")[-1])
    return done.stdout + done.stderr, imported  # Prefect's log is on stderr


def test_a_first_run_trains_and_a_run_with_nothing_new_imports_neither_tensorflow_nor_gx(tmp_path: Path) -> None:
    spec = write_mirror(tmp_path / "mirror", train_per_class=50, test_per_class=10)
    params = {
        "mirrors": [str(tmp_path / "mirror")],
        "dataset": spec.model_dump(mode="json"),
        "training": {"epochs": 1},
        "promotion": {"min_accuracy": 0.5},
    }
    first, imported = run_once(tmp_path, params, PREFECT_LOGGING_LEVEL="DEBUG")
    assert "Registered v0001" in first and (tmp_path / "artifacts" / "versions" / "v0001" / "model.keras").is_file()
    assert {"tensorflow", "great_expectations"} <= set(imported)
    # No heartbeats to a server that dies with the process: joining their thread cost up to 1 s a flow run.
    assert "DEBUG   | Flow run" in first and "heartbeat" not in first

    again, imported = run_once(tmp_path, params)
    assert "Champion v0001 is current; nothing retrained." in again
    assert imported == []
