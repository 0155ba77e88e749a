"""The prediction server as a real process on a free loopback port, called over real HTTP: TF Serving's
request and response shapes, PNG classification, a 400 (or 413) naming each bad input, and the switch
to a new champion under a load of concurrent clients with no failed request."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fmnist.data.dataset import CLASS_NAMES
from fmnist.ops import cli
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry
from fmnist.serving.payloads import MAX_INSTANCES
from fmnist.serving.server import MAX_JSON_BYTES
from fmnist.storage import Store, join
from fmnist.training.export import saved_model_predictions
from tests.helpers import run_manifest, synthetic_images
from tests.seaweedfs import S3Server
from tests.serving_helpers import (
    POLL_S,
    PREDICT,
    image_rows,
    keras_probabilities,
    running_server,
    two_version_registry,
)

pytestmark = pytest.mark.training

CLASSIFY = "/v1/models/fashion-mnist:classify-png"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return two_version_registry(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(registry.root, tmp_path_factory.mktemp("server") / "serve.log") as running:
        yield running.url


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_tf_serving_requests_and_answers(server: str, registry: Registry) -> None:
    status = httpx.get(f"{server}/v1/models/fashion-mnist")
    assert status.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    images = synthetic_images(np.array([0, 3, 7, 9], dtype=np.uint8), seed=11)
    expected = keras_probabilities(registry, "v0001", images)
    instances = [
        images[0].tolist(),  # 28x28 integers: raw pixels
        (images[1].reshape(-1) / 255).tolist(),  # 784 floats in [0, 1]
        images[2].tolist(),
        images[3].reshape(-1).tolist(),  # 784 integers
    ]
    answer = httpx.post(f"{server}{PREDICT}", json={"instances": instances})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "v0001"
    predictions = np.array(answer.json()["predictions"])
    assert predictions.shape == (4, 10) and np.abs(predictions - expected).max() <= 1e-5
    named = httpx.post(f"{server}{PREDICT}", json={"instances": [{"images": image} for image in instances]})
    assert np.abs(np.array(named.json()["predictions"]) - expected).max() <= 1e-5  # the input named, as TF allows
    columnar = httpx.post(f"{server}{PREDICT}", json={"inputs": [images[0].tolist()]})
    assert np.abs(np.array(columnar.json()["outputs"]) - expected[:1]).max() <= 1e-5
    metadata = httpx.get(f"{server}/v1/models/fashion-mnist/metadata").json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["images"]["dtype"] == "DT_UINT8" and metadata["model_spec"]["version"] == "1"
    assert metadata["fashion_mnist"]["metrics"]["test_accuracy"] == registry.manifest("v0001").metrics.test_accuracy
    assert httpx.get(f"{server}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server}/readyz").json()["version"] == "v0001"


def test_png_uploads_are_classified(server: str, registry: Registry) -> None:
    images = synthetic_images(np.array([1, 8], dtype=np.uint8), seed=12)
    files = [("image", ("trouser.png", png_bytes(images[0]))), ("image", ("bag.png", png_bytes(images[1])))]
    answer = httpx.post(f"{server}{CLASSIFY}", files=files)
    assert answer.status_code == 200, answer.text
    expected = keras_probabilities(registry, "v0001", images)
    for result, row, name in zip(answer.json()["results"], expected, ("trouser.png", "bag.png"), strict=True):
        best = int(row.argmax())
        assert result == {
            "file": name,
            "class": CLASS_NAMES[best],
            "index": best,
            "probability": pytest.approx(float(row[best]), abs=1e-5),
            "version": "v0001",
        }


BAD_PREDICT_BODIES = {
    "not JSON": (b"{instances: [", 400, "JSON Parse error"),
    "no instances": (b'{"images": []}', 400, "Missing 'inputs' or 'instances' key"),
    "empty": (b'{"instances": []}', 400, "No values in 'instances' array"),
    "wrong shape": (json.dumps({"instances": [[[0] * 28] * 27]}).encode(), 400, "instance 0: expected 28x28"),
    "ragged": (json.dumps({"instances": [[[0] * 28] * 27 + [[0] * 3]]}).encode(), 400, "rows of different lengths"),
    "pixel over 255": (
        json.dumps({"instances": [image_rows(256)]}).encode(),
        400,
        "integer pixels are raw 8-bit values, 0..255; got 256..256",
    ),
    "negative pixel": (json.dumps({"instances": [image_rows(-1)]}).encode(), 400, "0..255; got -1..-1"),
    "float over 1": (json.dumps({"instances": [image_rows(1.5)]}).encode(), 400, "float pixels must be in [0, 1]"),
    "NaN": (json.dumps({"instances": [image_rows(float("nan"))]}).encode(), 400, "NaN and Infinity are not pixels"),
    "strings": (json.dumps({"instances": [image_rows("x")]}).encode(), 400, "instance 0: pixels must be numbers"),
    "too many": (
        json.dumps({"instances": [[0] * 784] * (MAX_INSTANCES + 1)}).encode(),
        400,
        f"{MAX_INSTANCES + 1:,} instances; at most {MAX_INSTANCES:,}",
    ),
    "too big": (b" " * (MAX_JSON_BYTES + 1), 413, f"at most {MAX_JSON_BYTES:,} are accepted"),
}


@pytest.mark.parametrize("case", BAD_PREDICT_BODIES, ids=list(BAD_PREDICT_BODIES))
def test_a_bad_predict_request_gets_an_error_that_names_the_problem(server: str, case: str) -> None:
    body, status, message = BAD_PREDICT_BODIES[case]
    answer = httpx.post(f"{server}{PREDICT}", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_bad_uploads_and_paths_get_errors_and_the_server_goes_on(server: str) -> None:
    small = np.zeros((27, 27), np.uint8)
    cases = [
        ({"content": b"\x89PNG..."}, 400, "send the PNG files as multipart/form-data"),
        ({"files": [("image", ("notes.png", b"hello"))]}, 400, "notes.png: not a PNG image"),
        ({"files": [("image", ("small.png", png_bytes(small)))]}, 400, "small.png: image is 27x27; expected 28x28"),
        ({"data": {"comment": "no file"}, "files": [("x", ("x.png", b""))]}, 400, "form field 'comment' is not a file"),
        ({"files": [("image", ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(2 << 20)))]}, 400, "over the 1,048,576-byte"),
    ]
    for request, status, message in cases:
        answer = httpx.post(f"{server}{CLASSIFY}", **request)
        assert answer.status_code == status and message in answer.json()["error"], (message, answer.text)
    answer = httpx.post(f"{server}/v1/models/other:predict", json={"instances": [image_rows(0)]})
    assert answer.status_code == 404 and "Servable not found for request: Latest(other)" in answer.json()["error"]
    assert httpx.post(f"{server}{PREDICT}", json={"instances": [image_rows(0)]}).status_code == 200


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
            in_bucket.register({"model.keras": model}, run_manifest(accuracy), floor=0.8, tolerance=0.005)
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


def test_at_its_connection_limit_connections_waiting_on_their_bodies_make_room(
    registry: Registry, tmp_path: Path
) -> None:
    """Connections whose bodies are still coming fill the limit: the next request is answered, and the one
    that has waited longest is cut off with a 408 (such connections used to refuse everyone with a 503)."""
    with running_server(registry.root, tmp_path / "serve.log", None, "--max-connections", "3") as running:
        url = running.url
        host, port = url.removeprefix("http://").split(":")
        held = []
        try:
            for _ in range(3):  # a head, and the first bytes of a body that never comes
                connection = socket.create_connection((host, int(port)), timeout=10)
                connection.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
                held.append(connection)
                time.sleep(0.2)
            answer = httpx.post(f"{url}{PREDICT}", json={"instances": [image_rows(0)]}, timeout=10)
            assert answer.status_code == 200
            oldest = held[0].recv(65536)
            assert oldest.startswith(b"HTTP/1.1 408 ") and b"connection limit" in oldest, oldest[:200]
        finally:
            for connection in held:
                connection.close()


def test_a_damaged_pointer_keeps_the_version_in_service_and_the_server_follows_its_repair(
    server: str, registry: Registry
) -> None:
    served = httpx.get(f"{server}/readyz").json()["version"]
    other = "v0002" if served == "v0001" else "v0001"
    Path(registry.champion_file).write_text("{not json")
    time.sleep(4 * POLL_S)
    answer = httpx.post(f"{server}{PREDICT}", json={"instances": [image_rows(0)]})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == served
    registry.promote(other, "replaces the damaged pointer")  # the server still follows the pointer
    deadline = time.monotonic() + 30
    while httpx.get(f"{server}/readyz").json()["version"] != other:
        assert time.monotonic() < deadline, f"still serving {served} 30 s after the pointer was repaired"
        time.sleep(0.2)


def test_a_champion_whose_model_does_not_verify_is_never_served(server: str, registry: Registry) -> None:
    served = httpx.get(f"{server}/readyz").json()["version"]
    other = "v0002" if served == "v0001" else "v0001"
    # Someone swaps the other version's model and points champion.json at it by hand.
    registry.store.write_bytes(join(registry.version_dir(other), "model.keras"), b"not the registered model")
    model_sha256 = registry.manifest(other).files["model.keras"]  # the pointer vouches for the registered model
    pointer = {**registry.champion_record(), "version": other, "sequence": 99, "model_sha256": model_sha256}
    Path(registry.champion_file).write_text(json.dumps(pointer))
    time.sleep(4 * POLL_S)
    answer = httpx.post(f"{server}{PREDICT}", json={"instances": [image_rows(0)]})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == served
    assert httpx.get(f"{server}/readyz").json()["version"] == served
