"""For the serving tests, a registry of two versions, v0001 the champion and v0002 (another seed)
registered but kept back: of trained Keras models served by `fashion-mnist serve` on free loopback
ports (a real process), or of stub models (a linear layer in numpy, no TensorFlow) served by the
application in this process, through Starlette's test client."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from fmnist.data.cache import SCALED, normalize
from fmnist.data.dataset import IMAGE_SIZE, NUM_CLASSES
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry
from fmnist.serving.models import ModelCall, ModelLoader
from fmnist.serving.options import ServeOptions
from fmnist.serving.server import create_app
from fmnist.storage import Store, StoredFile
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams, load_verified_model
from tests.helpers import GATE, ROOT, learnable_cache, local_run, run_manifest
from tests.processes import free_ports, stop, wait_until_ready

PREDICT = "/v1/models/fashion-mnist:predict"
POLL_S = 0.5


def two_version_registry(root: Path) -> Registry:
    cached = learnable_cache(root / "cache")
    registry = Registry(Store(), str(root / "artifacts"))
    for seed, accuracy in ((1, 0.9), (2, 0.85)):
        trained = train_model(cached, TrainParams(epochs=1, seed=seed), local_run(root / f"run-{seed}"))
        registry.register({"model.keras": trained.model}, run_manifest(accuracy), GATE)
    assert registry.champion() == "v0001"
    return registry


def write_stub_registry(root: Path, registry: Registry | None = None) -> Registry:
    """`two_version_registry`'s registry of stub models: each `model.keras` holds a linear layer's
    weights (a .npy file) that `load_stub_model` serves, verified as the registry records it. In
    `registry` (empty; anywhere, a bucket too), else in `root`/artifacts; the models are made in `root`."""
    registry = registry or Registry(Store(), str(root / "artifacts"))
    for seed, accuracy in ((1, 0.9), (2, 0.85)):
        model = root / f"stub-{seed}" / "model.keras"
        model.parent.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        with model.open("wb") as out:  # (np.save given a path would add .npy to its name)
            np.save(out, rng.normal(0, 0.1, (IMAGE_SIZE * IMAGE_SIZE + 1, NUM_CLASSES)).astype(np.float32))
        stored = StoredFile(str(model), Store().sha256(str(model)))
        registry.register({"model.keras": stored}, run_manifest(accuracy), GATE)
    assert registry.champion() == "v0001"
    return registry


def load_stub_model(registry: Registry, record: dict) -> tuple[ModelCall, str]:
    """The server's model loader (`fmnist.serving.models.load_model`) for `write_stub_registry`'s models."""
    stored = registry.champion_model(record)
    weights = np.load(registry.store.local_copy(stored))  # (its sha256 verified)
    return lambda images: stub_call(weights, images), stored.sha256


def stub_call(weights: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Softmax of a linear layer: float32 (n, 28, 28) in [0, 1] -> (n, 10)."""
    logits = images.reshape(len(images), -1) @ weights[:-1] + weights[-1]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def stub_probabilities(registry: Registry, version: str, images: np.ndarray) -> np.ndarray:
    """What the stub model of `version` answers for raw uint8 `images` (`keras_probabilities`' stand-in)."""
    return stub_call(np.load(registry.store.local_copy(registry.file(version, "model.keras"))), SCALED[images])


@contextmanager
def app_client(registry: Registry, load: ModelLoader | None = None, **options) -> Iterator[TestClient]:
    """The application on `registry`'s stub models, in this process (its lifespan running: it follows
    the registry), through Starlette's test client; once it serves its champion. REST only, and the
    bodies parsed on the event loop (the worker processes, gRPC and sockets are the real-process tests')."""
    settings = ServeOptions(grpc_port=None, parse_workers=0, poll_s=POLL_S, **options)
    with TestClient(create_app(registry, settings, load=load or load_stub_model)) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").text
            time.sleep(0.05)
        yield client


@contextmanager
def labeled_canary(registry: Registry, client: httpx.Client) -> Iterator[None]:
    """v0002 labeled canary (as `fashion-mnist label` labels it), and served as it; the label cleared after."""
    from fmnist.ops import cli

    assert cli.main(["--registry", registry.root, "label", "canary", "v0002"]) == 0
    wait_for_versions(client, ["1", "2"])
    yield
    Labels(registry).clear("canary")
    wait_for_versions(client, ["1"])


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """The server's Prometheus metrics, scraped and parsed with prometheus-client's parser: each sample's
    value by its name and its labels (sorted)."""
    page = client.get("/monitoring/prometheus/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    return parsed_samples(page.text)


def parsed_samples(page: str) -> dict[tuple[str, tuple], float]:
    """A Prometheus metrics page's samples, each value by its name and its labels (sorted)."""
    samples = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def versions_served(client: httpx.Client) -> list[str]:
    """The versions a server (the test client, or an httpx client on a real one) says are AVAILABLE."""
    status = client.get("/v1/models/fashion-mnist").json()["model_version_status"]
    return [s["version"] for s in status if s["state"] == "AVAILABLE"]


def wait_for_versions(client: httpx.Client, versions: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (served := versions_served(client)) != versions:
        assert time.monotonic() < deadline, f"serving {served}, not {versions}, after {timeout_s} s"
        time.sleep(POLL_S / 2)


@dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    log: Path


@contextmanager
def running_server(
    registry_root: str,
    log: Path,
    env: dict[str, str] | None = None,
    *options: str,
    max_files: int | None = None,
    ports: tuple[int, int] | None = None,
    stub: bool = False,
) -> Iterator[RunningServer]:
    """`fashion-mnist serve` on free loopback ports (REST and gRPC; or `ports`), until it is ready. Stopped after.
    `max_files`: the process's limit on open files (soft and hard), as `ulimit -n` sets it. `stub`: on
    `write_stub_registry`'s models, without TensorFlow (`tests.stub_serve`)."""
    port, grpc_port = ports or free_ports(2)
    program = "tests.stub_serve" if stub else "fmnist.ops.cli"
    command = [sys.executable, "-m", program, "--registry", registry_root, "--scratch", str(log.parent)]
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
            env={**os.environ, **(env or {}), **({"PYTHONPATH": str(ROOT)} if stub else {})},
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
