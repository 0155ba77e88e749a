"""The edge: nginx (Debian's package) in front of the prediction server, for REST and gRPC.

A Python server is not what meets hostile clients: nginx holds tens of thousands of idle connections in
a few MB, reads every request head and body under its own deadlines, buffers bodies (to disk past
`BODY_BUFFER_BYTES`) before the application sees a byte, limits each client address's requests at once
and per second, and bounds HTTP/2 streams. The application behind it listens on loopback ports and keeps
its own guards (`fmnist.serving.guard`) as a second line.

`nginx_config` writes the configuration; `Edge` runs nginx with it in the foreground, as a child of
`fashion-mnist serve --edge`: one process (no master whose workers could outlive it), as nobody when the
server runs as root, ended by the kernel when the server dies, its error log passed through the server's
rate-limited log. The reference page "Edge" shows the configuration an operator deploys, generated from
this module.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fmnist.serving.grpc_messages import MAX_MESSAGE_BYTES
from fmnist.serving.options import ServeOptions
from fmnist.serving.workers import die_with_parent

MAX_BODY_BYTES = 16 << 20  # the largest REST body the server accepts (a JSON predict of 1,024 images)
LARGE_BODY_BYTES = 1 << 20  # a body declared past this (or chunked) counts as a large upload
BODY_BUFFER_BYTES = 128 << 10  # bodies past this are buffered in a file, not in memory
START_S = 10.0  # for nginx to open its ports
MIN_ANSWER_S = 10.0  # the least the edge waits for the server's answer
PREFIX_PATTERN = "fmnist-edge-*"  # the edge's folders, in the temporary folder
PID_DIGITS = 10  # a pid is under 2**22 on Linux
LOCK_NAME = "owner.lock"  # in an edge's folder, locked by its server while it lives

log = logging.getLogger(__name__)


class EdgeError(RuntimeError):
    """nginx is missing, refused its configuration, could not open its ports, or died."""


@dataclass(frozen=True)
class EdgeLimits:
    """What one client address may hold, and the deadlines of every phase, at the edge."""

    header_s: float = 5.0  # a request head (HTTP/1.1), or an HTTP/2 connection's next frame
    body_read_s: float = 5.0  # between two reads of a body (nginx has no whole-body deadline; see docs)
    idle_s: float = 30.0  # a keep-alive connection with no request
    answer_s: float = 30.0  # for the application to answer
    requests_per_client: int = 128  # requests (HTTP/2: streams) one address has open at once
    large_uploads_per_client: int = 4  # of them, bodies past LARGE_BODY_BYTES (buffered on disk)
    rate_per_client: int = 5000  # requests a second one address may send, with a burst of as many
    streams_per_connection: int = 128  # HTTP/2 streams at once on one connection (nginx's default)
    worker_connections: int = 32768  # connections nginx holds at once (idle ones included)
    upstream_idle: int = 64  # idle connections kept open to the application, per protocol
    upstream_busy: int = 256  # requests passed to the application at once, per protocol; beyond, a 502 at once

    @classmethod
    def of(cls, options: ServeOptions) -> EdgeLimits:
        """The edge's limits from the server's: the same head deadline, a body's reads under it too, the
        body deadline for an answer but never under MIN_ANSWER_S (a loaded server's queue), as many requests
        at once as the server answers, and fewer idle connections than a quarter of that."""
        return cls(
            header_s=options.header_timeout_s,
            body_read_s=options.header_timeout_s,
            answer_s=max(options.body_timeout_s, MIN_ANSWER_S),
            upstream_busy=options.max_connections,
            upstream_idle=max(min(64, options.max_connections // 4), 1),
        )


@dataclass(frozen=True)
class EdgePlan:
    """`fashion-mnist serve --edge`: the edge's limits, and the loopback ports the application takes behind it."""

    limits: EdgeLimits
    app_rest_port: int
    app_grpc_port: int


@dataclass(frozen=True)
class EdgeAddresses:
    host: str  # where clients connect
    rest_port: int
    grpc_port: int | None
    app_rest: str  # host:port of the application's REST, behind the edge
    app_grpc: str | None  # host:port of its gRPC


def behind_edge(options: ServeOptions, plan: EdgePlan) -> tuple[ServeOptions, EdgeAddresses]:
    """The application's options behind the edge (the plan's loopback ports), and the edge's addresses.
    The edge passes the server at most `upstream_busy` requests at once and keeps `upstream_idle` idle
    connections: the server allows more connections than that, so that it never closes the edge's own to
    make room (under load it did, and the edge passed the 408 on, or a 502)."""
    rest, grpc = plan.app_rest_port, plan.app_grpc_port
    has_grpc = options.grpc_port is not None
    connections = plan.limits.upstream_busy + plan.limits.upstream_idle + 16
    app = options.model_copy(
        update={
            "host": "127.0.0.1",
            "port": rest,
            "grpc_port": grpc if has_grpc else None,
            "max_connections": max(options.max_connections, connections),
        }
    )
    addresses = EdgeAddresses(
        options.host, options.port, options.grpc_port, f"127.0.0.1:{rest}", f"127.0.0.1:{grpc}" if has_grpc else None
    )
    return app, addresses


def within_descriptor_limit(limits: EdgeLimits) -> EdgeLimits:
    """`limits` with no more connections than nginx may open files for (its hard limit: raising it needs
    CAP_SYS_RESOURCE, which a container's root may lack)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or limits.worker_connections * 2 <= hard:
        return limits
    log.warning(
        "the edge holds at most %d connections: its limit on open files is %d (raise LimitNOFILE / ulimit -Hn)",
        hard // 2,
        hard,
    )
    return replace(limits, worker_connections=hard // 2)


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_config(addresses: EdgeAddresses, prefix: Path, limits: EdgeLimits) -> str:
    """nginx.conf for the edge: temporary files and the pid under `prefix`, the error log on stderr."""
    grpc = _grpc_server(addresses, limits) if addresses.grpc_port is not None else ""
    return f"""# The prediction server's edge (fmnist.serving.edge), generated: change the code, not this.
# One process: started by `fashion-mnist serve --edge`, which it dies with.
master_process off;
worker_processes 1;
pid {prefix}/run/nginx.pid;
error_log stderr warn;
events {{
    worker_connections {limits.worker_connections};
}}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {prefix}/run/body;
    proxy_temp_path {prefix}/run/proxy;
    fastcgi_temp_path {prefix}/run/fastcgi;
    uwsgi_temp_path {prefix}/run/uwsgi;
    scgi_temp_path {prefix}/run/scgi;

    # Every phase has a deadline; a timed-out connection is reset, not lingered on.
    client_header_timeout {limits.header_s:g}s;
    client_body_timeout {limits.body_read_s:g}s;
    send_timeout {limits.answer_s:g}s;
    keepalive_timeout {limits.idle_s:g}s;
    keepalive_requests 1000;
    reset_timedout_connection on;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    client_body_buffer_size {BODY_BUFFER_BYTES >> 10}k;

    # Per client address: requests (HTTP/2 streams) open at once, large uploads (declared past
    # {LARGE_BODY_BYTES:,} bytes, or chunked) open at once, and requests a second. Refusals are logged
    # at info, below the error log's level: an attacker's refusals do not fill the log.
    map $http_content_length $large_by_length {{
        "" "";
        "~^[0-9]{{1,{len(str(LARGE_BODY_BYTES)) - 1}}}$" "";
        default $binary_remote_addr;
    }}
    map $http_transfer_encoding $large_by_chunks {{
        "" "";
        default $binary_remote_addr;
    }}
    limit_conn_zone $binary_remote_addr zone=requests_per_client:10m;
    limit_conn_zone $large_by_length$large_by_chunks zone=large_uploads_per_client:10m;
    limit_req_zone $binary_remote_addr zone=rate_per_client:10m rate={limits.rate_per_client}r/s;
    limit_conn requests_per_client {limits.requests_per_client};
    limit_conn large_uploads_per_client {limits.large_uploads_per_client};
    limit_req zone=rate_per_client burst={limits.rate_per_client} nodelay;
    limit_conn_status 429;
    limit_req_status 429;
    limit_conn_log_level info;
    limit_req_log_level info;

    # HTTP/2 (gRPC): client_header_timeout and keepalive_timeout above bound its frames and idle time too.
    http2_max_concurrent_streams {limits.streams_per_connection};

    upstream app_rest {{
        server {addresses.app_rest} max_conns={limits.upstream_busy};
        keepalive {limits.upstream_idle};
    }}
    server {{
        listen {listen_address(addresses.host, addresses.rest_port)} backlog=4096;
        client_max_body_size {MAX_BODY_BYTES >> 20}m;
        location / {{
            proxy_pass http://app_rest;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $proxy_host;  # (an HTTP/1.0 client may send none)
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_request_buffering on;  # the whole body, before the application sees a byte
            proxy_connect_timeout 2s;
            proxy_send_timeout {limits.answer_s:g}s;
            proxy_read_timeout {limits.answer_s:g}s;
            # An idle connection the server closed is tried again on a new one; a request once sent is not.
            proxy_next_upstream error;
            proxy_next_upstream_tries 2;
        }}
{_json_errors()}
    }}
{grpc}}}
"""


JSON_ERRORS = {
    400: "the edge could not read this request",
    413: f"the body is over {MAX_BODY_BYTES:,} bytes, the most accepted",
    414: "the request line is too long",
    429: "too many requests from this address; try again shortly",
    494: "a request header is too long",
    505: "this HTTP version is not supported; send HTTP/1.1 (or HTTP/2 to the gRPC port)",
    502: "the prediction server behind the edge is busy or not answering; try again shortly",
    504: "the prediction server behind the edge did not answer in time",
}
GRPC_ERRORS = {  # HTTP status at the edge: (gRPC status code, message)
    413: (8, f"the message is over {MAX_MESSAGE_BYTES:,} bytes, the most accepted"),  # RESOURCE_EXHAUSTED
    429: (8, "too many calls from this address; try again shortly"),
    502: (14, "the prediction server behind the edge is busy or not answering; try again shortly"),  # UNAVAILABLE
    504: (4, "the prediction server behind the edge did not answer in time"),  # DEADLINE_EXCEEDED
}


def _json_errors() -> str:
    """The edge's own refusals in the server's error form, `{"error": ...}` (messages hold no quote).
    Internal URIs, not named locations: a request line nginx could not read has no URI to carry."""
    pages = [f"        error_page {code} /.edge/{code};" for code in JSON_ERRORS]
    for code, message in JSON_ERRORS.items():
        pages.append(
            f"        location = /.edge/{code} {{ internal; default_type application/json; "
            f'return {code} \'{{"error": "{message}"}}\'; }}'
        )
    return "\n".join(pages)


def _grpc_server(addresses: EdgeAddresses, limits: EdgeLimits) -> str:
    # A refusal at the edge as gRPC says it: a trailers-only answer with grpc-status (nginx's own recipe).
    pages = [f"        error_page {code} = @grpc_{code};" for code in GRPC_ERRORS]
    for code, (status, message) in GRPC_ERRORS.items():
        pages.append(
            f"        location @grpc_{code} {{ internal; default_type application/grpc; "
            f'add_header grpc-status {status} always; add_header grpc-message "{message}" always; '
            "add_header content-length 0 always; return 204; }"
        )
    errors = "\n".join(pages)
    upstream = f"""            grpc_pass grpc://app_grpc;
            grpc_set_header X-Forwarded-For $remote_addr;
            grpc_connect_timeout 2s;
            grpc_send_timeout {limits.answer_s:g}s;
            grpc_next_upstream error;
            grpc_next_upstream_tries 2;"""
    return f"""    upstream app_grpc {{
        server {addresses.app_grpc} max_conns={limits.upstream_busy};
        keepalive {limits.upstream_idle};
    }}
    server {{
        listen {listen_address(addresses.host, addresses.grpc_port)} http2 backlog=4096;
        client_max_body_size {MAX_MESSAGE_BYTES >> 20}m;
        location / {{
{upstream}
            grpc_read_timeout {limits.answer_s:g}s;
        }}
        location = /grpc.health.v1.Health/Watch {{  # a stream that lives as long as its client wants
{upstream}
            grpc_read_timeout 1h;
        }}
{errors}
    }}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if not found:
        raise EdgeError("nginx is not installed: apt-get install nginx (or serve without --edge behind your own proxy)")
    return found


def as_nobody() -> tuple[int, int] | None:
    """Who nginx runs as: nobody when the server runs as root (it needs no more), else the server's user."""
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _start_nginx(ids: tuple[int, int] | None, max_files: int, parent: int) -> None:
    """In the child, before nginx: open as many files as allowed, drop root, and die with the server (in
    that order: a change of user clears the parent-death signal)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max(max_files, hard)))
    except (ValueError, OSError):  # not allowed past the hard limit: take all of it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if ids:
        os.setgroups([])
        os.setgid(ids[1])
        os.setuid(ids[0])
    die_with_parent(parent, signal.SIGTERM)  # (SIGTERM: nginx's own fast shutdown)


def sweep_stale_prefixes(folder: Path) -> None:
    """Remove the folders of edges that died with their server (SIGKILL leaves them): ours, whose server no
    longer holds its lock. The lock is the kernel's, released however the server ends, and seen from any
    container sharing the folder. Until the lock file exists, the server's pid in the folder's name keeps
    a folder another server on this host is still setting up from being taken from under it."""
    for prefix in folder.glob(PREFIX_PATTERN):
        try:
            if prefix.is_symlink() or not prefix.is_dir() or prefix.stat().st_uid != os.geteuid():
                continue
        except OSError:
            continue
        held = _lock_held(prefix / LOCK_NAME)
        if held or (held is None and Path(f"/proc/{_owner_pid(prefix.name) or 'none'}").exists()):
            continue
        shutil.rmtree(prefix, ignore_errors=True)


def _lock_held(lock: Path) -> bool | None:
    """Whether a server holds this lock file; None if there is no such file. Opened without following a link
    or waiting on a FIFO (anyone who can write `run/` could put one beside it), and never read."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return False  # a link, or no file a server made: not a live edge's
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _owner_pid(name: str) -> int:
    """The pid of the server that made the folder `name` (fmnist-edge-PID-random), 0 if it names none."""
    owner = name.removeprefix(PREFIX_PATTERN.rstrip("*")).split("-", 1)[0]
    # Anyone may name a folder here: ASCII digits only (str.isdigit takes '²', which int() refuses), no longer
    # than a pid, so that no name can stop a server's start.
    return int(owner) if owner.isascii() and owner.isdigit() and len(owner) <= PID_DIGITS else 0


class Edge:
    """nginx with the edge's configuration, in the foreground, until `stop` (or this process's death)."""

    def __init__(self, addresses: EdgeAddresses, limits: EdgeLimits, log_line) -> None:
        self.addresses, self.limits = addresses, limits
        self.log_line = log_line  # each line nginx logs (through the server's rate-limited log)
        self.process: subprocess.Popen | None = None
        self.prefix: Path | None = None
        self.lock: int | None = None  # the folder's lock file, held open
        self.stopping = False

    def write_config(self) -> Path:
        """A fresh folder of the edge's own: the configuration, and `run/` for nginx's files (nobody's, as root)."""
        folder = Path(tempfile.gettempdir())
        sweep_stale_prefixes(folder)
        self.prefix = Path(tempfile.mkdtemp(prefix=f"{PREFIX_PATTERN.rstrip('*')}{os.getpid()}-", dir=folder))
        # Held for the server's life (not inherited by nginx): the sweep of any later server leaves the folder.
        self.lock = os.open(self.prefix / LOCK_NAME, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        ids = as_nobody()
        run = self.prefix / "run"
        for temp in (run, *(run / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"))):
            temp.mkdir(mode=0o700)
            if ids:
                os.chown(temp, *ids)
        if ids:  # nobody must reach run/ and read the configuration, and nothing else of ours
            os.chmod(self.prefix, 0o711)
        config = self.prefix / "nginx.conf"
        config.write_text(nginx_config(self.addresses, self.prefix, within_descriptor_limit(self.limits)))
        config.chmod(0o644)
        return config

    def start(self) -> None:
        ports = [p for p in (self.addresses.rest_port, self.addresses.grpc_port) if p is not None]
        if taken := [port for port in ports if _accepts(self.addresses.host, port)]:
            raise EdgeError(f"{self.addresses.host}:{taken} already answer: another server or edge holds them")
        config = self.write_config()
        command = [nginx_binary(), "-p", str(self.prefix), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=functools.partial(_start_nginx, as_nobody(), self.limits.worker_connections * 2, os.getpid()),
            text=True,
            errors="replace",
        )
        self.pump = threading.Thread(target=self._pump_log, daemon=True, name="edge-log")
        self.pump.start()
        self._wait_for_ports(ports)

    def _pump_log(self) -> None:
        for line in self.process.stderr:
            self.log_line(line.rstrip())

    def _wait_for_ports(self, ports: list[int]) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.pump.join(1.0)  # its last lines say why
                self.stop()
                raise EdgeError(f"nginx exited ({self.process.returncode}) at start: see the log above")
            if all(_accepts(self.addresses.host, port) for port in ports):
                return
            time.sleep(0.05)
        self.stop()
        raise EdgeError(f"nginx did not open {self.addresses.host}:{ports} within {START_S:g} s")

    def died(self) -> bool:
        """nginx ended without being asked to."""
        return not self.stopping and self.process is not None and self.process.poll() is not None

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop nginx gracefully (open requests are answered) and remove its folder."""
        self.stopping = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
