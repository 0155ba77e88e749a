"""The edge's nginx configuration, as `fashion-mnist serve --edge` writes it: nginx itself accepts it
(`nginx -t`), for IPv4 and IPv6 hosts, with and without gRPC, and its limits follow the server's; and its
folders, swept only when their server and nginx are gone."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.serving.edge import (
    LOCK_NAME,
    MIN_ANSWER_S,
    EdgeAddresses,
    EdgeLimits,
    EdgePlan,
    behind_edge,
    nginx_binary,
    nginx_config,
    sweep_stale_prefixes,
)
from fmnist.serving.options import ServeOptions

ADDRESSES = EdgeAddresses("127.0.0.1", 8501, 8500, "127.0.0.1:18501", "127.0.0.1:18500")


def nginx_accepts(config: str, prefix: Path) -> subprocess.CompletedProcess:
    for folder in ("run/body", "run/proxy", "run/fastcgi", "run/uwsgi", "run/scgi"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(config)
    command = [nginx_binary(), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
    reason="nginx is not installed here (make edge, or .ci/run, installs it)",
)


@needs_nginx
@pytest.mark.parametrize(
    "addresses",
    [
        ADDRESSES,
        EdgeAddresses("::1", 8501, 8500, "127.0.0.1:18501", "127.0.0.1:18500"),
        EdgeAddresses("0.0.0.0", 8501, None, "127.0.0.1:18501", None),
    ],
    ids=["ipv4", "ipv6", "rest-only"],
)
def test_nginx_accepts_the_configuration(addresses: EdgeAddresses, tmp_path: Path) -> None:
    done = nginx_accepts(nginx_config(addresses, tmp_path, EdgeLimits()), tmp_path)
    assert done.returncode == 0, done.stderr
    # (the descriptor limit is the host's: `Edge` lowers worker_connections to it when it starts nginx)
    warnings = [line for line in done.stderr.splitlines() if "[" in line and "worker_connections exceed" not in line]
    assert not warnings, warnings


def test_an_ipv6_host_is_bracketed_and_grpc_is_left_out_when_not_served() -> None:
    config = nginx_config(EdgeAddresses("::1", 8501, None, "127.0.0.1:1", None), Path("/p"), EdgeLimits())
    assert "listen [::1]:8501 " in config
    assert "grpc_pass" not in config and "http2" not in config.split("http2_max_concurrent_streams")[1]


def test_the_edges_limits_follow_the_servers() -> None:
    options = ServeOptions(header_timeout_s=2.0, body_timeout_s=17.0, max_connections=32)
    limits = EdgeLimits.of(options)
    assert (limits.header_s, limits.body_read_s, limits.answer_s) == (2.0, 2.0, 17.0)
    assert EdgeLimits.of(ServeOptions(body_timeout_s=1.0)).answer_s == MIN_ANSWER_S
    # Fewer idle connections to the server than it allows, so that they never crowd out new ones.
    assert limits.upstream_idle == 8
    config = nginx_config(ADDRESSES, Path("/p"), limits)
    assert "client_header_timeout 2s;" in config and "keepalive 8;" in config and "proxy_read_timeout 17s;" in config
    # The edge passes the server as many requests at once as it answers, and the server behind it allows
    # more connections than the edge ever opens, so that it never closes the edge's own to make room.
    assert config.count("max_conns=32;") == 2
    app, _ = behind_edge(options, EdgePlan(limits, 18501, 18500))
    assert app.max_connections >= limits.upstream_busy + limits.upstream_idle


def test_an_edge_folder_is_swept_only_once_its_server_is_gone(tmp_path: Path) -> None:
    """Two servers starting on one host at once: the second's sweep once removed the first's folder before its
    nginx had written a pid (nginx then found no configuration, and the first server never started). A live
    server's lock keeps its folder (from another container's pid namespace too, where its pid means nothing);
    a lock no one holds does not, whatever process has the pid now; nothing planted in a folder stalls it."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(gone.stdout), os.getpid()
    folders = {
        "starting": tmp_path / f"fmnist-edge-{alive}-a1",  # its server alive, no lock yet
        "dead server": tmp_path / f"fmnist-edge-{dead}-b2",
        "locked, its pid another namespace's": tmp_path / f"fmnist-edge-{dead}-c3",
        "unlocked, its pid reused": tmp_path / f"fmnist-edge-{alive}-d4",
        "a FIFO for a lock": tmp_path / f"fmnist-edge-{dead}-e5",
        "a FIFO for nginx's pid": tmp_path / f"fmnist-edge-{dead}-f6",
        "no server named": tmp_path / "fmnist-edge-g7",
        "a digit that is not ASCII": tmp_path / "fmnist-edge-\u00b2-h8",
        "more digits than a pid": tmp_path / f"fmnist-edge-{'9' * 200}-i9",
    }
    for folder in folders.values():
        (folder / "run").mkdir(parents=True)
    for name in ("locked, its pid another namespace's", "unlocked, its pid reused"):
        (folders[name] / LOCK_NAME).touch()
    os.mkfifo(folders["a FIFO for a lock"] / LOCK_NAME)
    os.mkfifo(folders["a FIFO for nginx's pid"] / "run" / "nginx.pid")
    with open(folders["locked, its pid another namespace's"] / LOCK_NAME) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        sweep_stale_prefixes(tmp_path)
    kept = {name for name, folder in folders.items() if folder.exists()}
    assert kept == {"starting", "locked, its pid another namespace's"}
