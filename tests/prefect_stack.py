"""A real Prefect stack for the end-to-end tests: `prefect server start` on a free loopback port, workers,
`prefect deployment run --watch` as an operator types it, and reads of the server's REST API."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fmnist.ops.postgres import LocalPostgres
from tests.helpers import ROOT, write_mirror
from tests.processes import free_ports, stop, stop_all, wait_until_ready

PREFECT = str(Path(sys.executable).parent / "prefect")
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass
class Stack:
    """A Prefect server, and the processes (workers, CLIs) started against it."""

    env: dict[str, str]
    api: str
    port: int
    tmp: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    # The server's own PostgreSQL, when it has one (else SQLite under PREFECT_HOME).
    postgres: LocalPostgres | None = None
    server: subprocess.Popen | None = None

    def start(
        self, name: str, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, prefect: str = PREFECT
    ) -> subprocess.Popen:
        """`prefect ARGS` in its own session (so it and its children can be stopped together); log in tmp."""
        log = open(self.tmp / f"{name}.log", "a")  # noqa: SIM115 (closed with the process; a restart appends)
        process = subprocess.Popen(
            [prefect, *args], cwd=cwd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def start_server(self) -> None:
        """`prefect server start` on this stack's port and database; returns once it answers."""
        env = {**self.env, **(self.postgres.prefect_env() if self.postgres else {})}
        self.server = self.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), env=env)
        wait_until_ready(f"{self.api}/health", self.server, self.tmp / "server.log")

    def stop_server(self, kill: bool = True) -> None:
        """Stop the server (SIGKILL by default, as a crashed host); its workers and runs go on without it."""
        if kill:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
        else:
            stop(self.server)

    def get(self, path: str) -> dict:
        response = httpx.get(self.api + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict) -> Any:
        response = httpx.post(self.api + path, json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def filter(self, path: str, body: dict) -> list[dict]:
        return self.post(path, body)

    def artifacts(self, flow_run_id: str) -> dict[str, str]:
        found = self.filter("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
        return {a["key"]: str(a["data"]) for a in found}

    def logs(self, flow_run_ids: list[str]) -> list[str]:
        found = self.filter("/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}}, "limit": 200})
        return [log["message"] for log in found]

    def child_runs(self, parent_id: str, deployment: str) -> list[dict]:
        """Runs of `deployment` started by the flow run `parent_id`, oldest first."""
        runs = self.filter(
            "/flow_runs/filter",
            {
                "deployments": {"name": {"any_": [deployment]}},
                "flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}},
            },
        )
        return sorted(runs, key=lambda r: r["created"])

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """The operator's `fashion-mnist` CLI, against this stack's server."""
        cli = str(Path(sys.executable).parent / "fashion-mnist")
        return subprocess.run([cli, *args], env=self.env, capture_output=True, text=True, timeout=120)

    def deployment_run(self, deployment: str, **parameters: dict) -> subprocess.Popen:
        """`prefect deployment run --watch` with `--param name=JSON` for each parameter."""
        params = [arg for name, value in parameters.items() for arg in ("--param", f"{name}={json.dumps(value)}")]
        return subprocess.Popen(
            [PREFECT, "deployment", "run", deployment, *params, "--watch", "--watch-interval", "2"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finished(self, cli: subprocess.Popen, timeout_s: float = 700) -> dict:
        """Wait for the watching CLI to end, and the run to finish; the flow run as the API has it. (The
        CLI stops watching when the server goes away: "Stopped watching flow run ... before it reached a
        terminal state". The run goes on, and is waited for here.)"""
        deadline = time.monotonic() + timeout_s
        stdout, stderr = cli.communicate(timeout=timeout_s)
        match = re.search(r"UUID:\s+([0-9a-f-]{36})", stdout)
        assert match, stdout[-3000:] + stderr[-3000:]

        def final() -> dict | None:
            run = self.get(f"/flow_runs/{match.group(1)}")
            return run if run["state_type"] in FINAL_STATES else None

        return wait_for(f"flow run {match.group(1)} to finish", final, max(deadline - time.monotonic(), 1))


@contextmanager
def prefect_server(tmp: Path, database: str = "sqlite") -> Iterator[Stack]:
    """A `prefect server start` of its own (own PREFECT_HOME, free port, its database SQLite or a
    PostgreSQL cluster of its own); stops it, every process and the database after."""
    [port] = free_ports(1)
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    stack = Stack(env, api, port, tmp, postgres=LocalPostgres(tmp / "postgres") if database == "postgres" else None)
    try:
        if stack.postgres:
            stack.postgres.start()
        stack.start_server()
        yield stack
    finally:
        # The workers and CLIs first, together, then the server they report to.
        stop_all([p for p in stack.processes if p is not stack.server])
        stop_all([p for p in stack.processes if p is stack.server])
        if stack.postgres:
            stack.postgres.remove()  # its data too, wherever it lives (as root: under postgres's home)


def small_run_params(mirror: Path) -> dict:
    """The retrain's parameters for a small generated dataset on a local mirror: one epoch, a low floor."""
    spec = write_mirror(mirror, train_per_class=50, test_per_class=10)
    return {
        "mirrors": [str(mirror)],
        "dataset": spec.model_dump(),
        "training": {"epochs": 1},
        "promotion": {"min_accuracy": 0.5},
    }


def local_storage(stack: Stack, suffix: str = "") -> dict:
    return {"data_root": str(stack.tmp / f"data{suffix}"), "registry_root": str(stack.tmp / f"artifacts{suffix}")}


def start_deployment_run(stack: Stack, params: dict, storage: dict | None = None) -> subprocess.Popen:
    """`prefect deployment run` of the single-host ad-hoc retrain."""
    return stack.deployment_run("retrain-fashion-mnist/adhoc", params=params, storage=storage or local_storage(stack))


def make(stack: Stack, target: str, **variables: str) -> None:
    """`make TARGET VAR=value ...` against this stack's server, as an operator runs it."""
    args = [f"{name}={value}" for name, value in variables.items()]
    done = subprocess.run(
        ["make", target, f"PREFECT_PORT={stack.port}", *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def wait_for(what: str, check: Callable[[], object], timeout_s: float, every_s: float = 1.0) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {timeout_s} s")


class WebhookReceiver:
    """An operator's webhook endpoint on a free loopback port: keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def wait_for(self, *needles: str, timeout_s: float = 90) -> dict:
        """The first notification whose text holds every needle."""

        def found() -> dict | None:
            return next((n for n in self.received if all(x in json.dumps(n) for x in needles)), None)

        return wait_for(f"a notification with {needles} (received: {self.received})", found, timeout_s)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
