"""Servers the tests start: free loopback ports, and stopping a process with everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process started in a session of its own, and everything it started (workers run flows in
    child processes): SIGTERM, then SIGKILL after `timeout_s`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
