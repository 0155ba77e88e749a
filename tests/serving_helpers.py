"""A registry of two trained versions, and `fashion-mnist serve` on free loopback ports, for the
serving tests: v0001 the champion, v0002 (another seed) registered but kept back."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq

from fmnist.data.cache import normalize
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams, load_verified_model
from tests.helpers import learnable_cache, local_run, run_manifest
from tests.processes import free_ports, stop, wait_until_ready

PREDICT = "/v1/models/fashion-mnist:predict"
POLL_S = 0.5


def two_version_registry(root: Path) -> Registry:
    cached = learnable_cache(root / "cache")
    registry = Registry(Store(), str(root / "artifacts"))
    for seed, accuracy in ((1, 0.9), (2, 0.85)):
        trained = train_model(cached, TrainParams(epochs=1, seed=seed), local_run(root / f"run-{seed}"))
        registry.register({"model.keras": trained.model}, run_manifest(accuracy), floor=0.8, tolerance=0.005)
    assert registry.champion() == "v0001"
    return registry


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    log: Path


@contextmanager
def running_server(
    registry_root: str, log: Path, env: dict[str, str] | None = None, *options: str, max_files: int | None = None
) -> Iterator[RunningServer]:
    """`fashion-mnist serve` on free loopback ports (REST and gRPC), until it is ready. Stopped after.
    `max_files`: the process's limit on open files (soft and hard), as `ulimit -n` sets it."""
    port, grpc_port = free_ports(2)
    command = [sys.executable, "-m", "fmnist.ops.cli", "--registry", registry_root, "--scratch", str(log.parent)]
    serve = ["serve", "--port", str(port), "--grpc-port", str(grpc_port), "--poll-s", str(POLL_S), *options]

    def limit_files() -> None:
        if max_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, *serve],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            preexec_fn=limit_files,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", process, log)
        yield RunningServer(url, f"127.0.0.1:{grpc_port}", process, log)
        assert process.poll() is None, f"the server died:\n{log.read_text()[-3000:]}"
    finally:
        stop(process)


def keras_probabilities(registry: Registry, version: str, images: np.ndarray) -> np.ndarray:
    model = load_verified_model(registry.store, registry.file(version, "model.keras"))
    return model.predict(normalize(images).reshape(images.shape), verbose=0)


def captured_and_written(url: str, data_root: Path) -> int:
    """How many answers the server at `url` captured, once its records in `data_root` hold them all (else 0)."""
    page = httpx.get(f"{url}/monitoring/prometheus/metrics").text
    kept = int(float(re.search(r"^fashion_mnist_feedback_captured_total (\S+)$", page, re.M).group(1)))
    files = (data_root / "feedback" / "records").glob("*.parquet")
    return kept if kept and sum(pq.read_metadata(f).num_rows for f in files) == kept else 0


def image_rows(value) -> list:
    return [[value] * 28] * 28
