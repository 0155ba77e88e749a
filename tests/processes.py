"""Servers the tests start: free loopback ports, and stopping a process with everything it started."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

# What the tests' own processes run (a host registering, a client racing, a flood of calls), imported once.
FORKED_PRELOAD = ["tests.test_registry", "tests.test_storage", "tests.attackers"]


def forked_processes() -> multiprocessing.context.ForkServerContext:
    """A multiprocessing context for a test's own processes: each forked from a server that imported
    `FORKED_PRELOAD` once, so each is a process of its own (sharing nothing the test does not hand it, as
    hosts share nothing) that starts in milliseconds. A spawned one imported them again: 1.2 CPU-s each,
    and test_registry alone starts 22. Not `fork`: the test process holds threads (S3 clients, gRPC)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKED_PRELOAD)  # (taken when the server starts: the first use)
    return context


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Poll `url` until it answers 200; raise (with the end of `log`) if `process` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop a process started in a session of its own, and everything it started (workers run flows in
    child processes): SIGTERM, then SIGKILL after `timeout_s`."""
    stop_all([process], timeout_s)


def stop_all(processes: list[subprocess.Popen], timeout_s: float = 20) -> None:
    """`stop` for several at once: all are sent SIGTERM together and given the same `timeout_s` (one
    after another, a stack of workers that each wait out the grace took a minute to stop)."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def children(pid: int) -> list[int]:
    """The processes `pid`'s main thread started."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cmdline(pid: int) -> bytes:
    """A process's command line (NUL-separated), or nothing once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def rss_bytes(pid: int) -> int:
    """A process's resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")
