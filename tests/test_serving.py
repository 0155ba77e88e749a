"""The prediction server as a real process on a free loopback port, serving trained Keras models over real
HTTP: the switch to a new champion under a load of concurrent clients with no failed request (each
answer Keras' own), a registry in a bucket served and followed, and the connection limit's room-making.
The request and response shapes and the refusals, in this process on stub models: test_serving_rest."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fmnist.ops import cli
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from fmnist.training.export import saved_model_predictions
from tests.helpers import GATE, run_manifest, synthetic_images
from tests.seaweedfs import S3Server
from tests.serving_helpers import (
    PREDICT,
    image_rows,
    keras_probabilities,
    running_server,
    two_version_registry,
)

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return two_version_registry(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(registry.root, tmp_path_factory.mktemp("server") / "serve.log") as running:
        yield running.url


def hammer(server: str, image: list, stop_at: threading.Event, seen: list, failures: list) -> None:
    """One client: single-image requests, one after another, until told to stop."""
    with httpx.Client(base_url=server, timeout=30) as client:
        while not stop_at.is_set():
            try:
                answer = client.post(PREDICT, json={"instances": [image]})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if answer.status_code != 200:
                failures.append(f"{answer.status_code} {answer.text}")
            else:
                seen.append(answer.headers["x-model-version"])


def versions_under_load(server: str, change, until: str, clients: int = 8) -> list[list[str]]:
    """Each client's versions, in order, while `change()` moves the champion, until one serves `until`."""
    image = image_rows(0)
    stop_at, failures = threading.Event(), []
    seen = [[] for _ in range(clients)]
    threads = [threading.Thread(target=hammer, args=(server, image, stop_at, s, failures)) for s in seen]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        change()
        deadline = time.monotonic() + 30
        while not any(until in s for s in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # and then some more requests on the new one
    finally:
        stop_at.set()
        for thread in threads:
            thread.join()
    assert failures == [], failures[:5]
    return seen


def test_a_promotion_and_a_rollback_switch_the_served_version_with_no_failed_request(
    server: str, registry: Registry
) -> None:
    seen = versions_under_load(server, lambda: registry.promote("v0002", "under load"), until="v0002")
    for versions in seen:  # every request answered; each client saw v0001, then only v0002
        assert versions and versions == sorted(versions) and versions[-1] == "v0002", versions[:3]
    assert sum(len(v) for v in seen) > 50
    images = synthetic_images(np.array([4], dtype=np.uint8), seed=13)
    answer = httpx.post(f"{server}{PREDICT}", json={"instances": images.tolist()}).json()["predictions"]
    assert np.abs(np.array(answer) - keras_probabilities(registry, "v0002", images)).max() <= 1e-5
    assert httpx.get(f"{server}/v1/models/fashion-mnist").json()["model_version_status"][0]["version"] == "2"

    seen = versions_under_load(server, lambda: registry.rollback("back"), until="v0001")
    assert all(v and v == sorted(v, reverse=True) and v[-1] == "v0001" for v in seen)


def test_a_version_registered_without_an_export_is_exported_from_its_verified_model(
    registry: Registry, tmp_path: Path
) -> None:
    assert not [name for name in registry.manifest("v0002").files if name.startswith("saved_model/")]
    assert cli.main(["--registry", registry.root, "export", "v0002", "--out", str(tmp_path / "models")]) == 0
    images = synthetic_images(np.arange(10, dtype=np.uint8), seed=14)
    exported = saved_model_predictions(tmp_path / "models" / "2", images)
    assert np.abs(exported - keras_probabilities(registry, "v0002", images)).max() <= 1e-5
    assert cli.main(["--registry", registry.root, "export", "v0009", "--out", str(tmp_path / "models")]) == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["2"]  # nothing half-written


def test_the_champion_of_a_registry_in_a_bucket_is_served_and_followed(
    registry: Registry, s3_server: S3Server, tmp_path: Path
) -> None:
    env = s3_server.env()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        in_bucket = Registry(Store(scratch=tmp_path / "scratch"), f"s3://{s3_server.new_bucket()}/registry")
        for version, accuracy in (("v0001", 0.9), ("v0002", 0.85)):
            model = registry.file(version, "model.keras")
            in_bucket.register({"model.keras": model}, run_manifest(accuracy), GATE)
        with running_server(in_bucket.root, tmp_path / "serve.log", env) as running:
            url = running.url
            answer = httpx.post(f"{url}{PREDICT}", json={"instances": [image_rows(0)]})
            assert answer.status_code == 200 and answer.headers["x-model-version"] == "v0001"
            in_bucket.promote("v0002", "in the bucket")
            deadline = time.monotonic() + 30
            while httpx.get(f"{url}/readyz").json()["version"] != "v0002":
                assert time.monotonic() < deadline, "still serving v0001 30 s after the promotion"
                time.sleep(0.2)
            images = synthetic_images(np.array([5], dtype=np.uint8), seed=15)
            answer = httpx.post(f"{url}{PREDICT}", json={"instances": images.tolist()})
            expected = keras_probabilities(registry, "v0002", images)
            assert np.abs(np.array(answer.json()["predictions"]) - expected).max() <= 1e-5
            Labels(in_bucket).set("canary", "v0001", "a canary in the bucket")  # labels.json in the bucket
            canary = f"{url}/v1/models/fashion-mnist/labels/canary:predict"
            deadline = time.monotonic() + 30
            while (answer := httpx.post(canary, json={"instances": images.tolist()})).status_code != 200:
                assert time.monotonic() < deadline, f"no canary 30 s after it was labeled: {answer.text}"
                time.sleep(0.2)
            assert answer.headers["x-model-version"] == "v0001" and answer.headers["x-model-label"] == "canary"
            expected = keras_probabilities(registry, "v0001", images)
            assert np.abs(np.array(answer.json()["predictions"]) - expected).max() <= 1e-5
