"""Prefect's temporary server for one process, started before that process imports Prefect.

A bare flow call starts the same server (`PREFECT__SERVER_EPHEMERAL`: its services, no UI) only
when the flow is called, after the caller's imports, and then waits for it. Started first, by the
public CLI in a child process, it comes up while the caller imports what it needs.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable

# A first start makes the database (10 s on 2 cores); a loaded CI machine may take several times that.
SERVER_START_TIMEOUT_S = 120


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_temporary_server() -> Callable[[], str]:
    """Start a Prefect server for this run in a child process; the returned call waits for it and gives
    its API URL. It is Prefect's own temporary server (`PREFECT__SERVER_EPHEMERAL`: its services, no
    UI), started by the public CLI before this process imports Prefect, and stopped when it exits."""
    port = free_port()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open while the server runs; a pipe nobody reads could stall it
    server = subprocess.Popen(
        [*command, "--no-ui"],
        env={**os.environ, "PREFECT__SERVER_EPHEMERAL": "1"},
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    atexit.register(_stop, server)
    url = f"http://127.0.0.1:{port}/api"

    def api_url() -> str:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                output.seek(0)
                raise RuntimeError(
                    f"the temporary Prefect server exited ({server.returncode}): {output.read()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        return url
            except OSError:
                time.sleep(0.1)
        _stop(server)
        raise RuntimeError(f"the temporary Prefect server did not answer on {url} within {SERVER_START_TIMEOUT_S} s")

    return api_url


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
