"""TF Serving's REST API and the operator's routes, in this process on stub models (no TensorFlow), through
Starlette's test client: the request and response shapes at /versions/N and /labels/L, PNG classification,
TF Serving's refusals with its status codes (the cases of its http_rest_api_handler_test and json_tensor),
a canary labeled beside the champion and followed as the registry moves, canary routing and shadow
comparison, the Prometheus metrics, and a damaged pointer or model never served. What only a real process
shows (sockets, the worker processes, gRPC, Keras' own answers) is test_serving, test_serving_api and
test_serving_hostile's."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from fmnist.data.dataset import CLASS_NAMES
from fmnist.evaluation.evidence import read_windows, sum_windows
from fmnist.ops import cli
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry, RegistryError
from fmnist.serving.models import ModelCall
from fmnist.serving.payloads import MAX_INSTANCES
from fmnist.serving.rest import MAX_JSON_BYTES
from fmnist.serving.service import PredictionCore
from fmnist.storage import join
from tests.helpers import synthetic_images
from tests.serving_helpers import (
    POLL_S,
    PREDICT,
    app_client,
    image_rows,
    load_stub_model,
    metric_samples,
    stub_probabilities,
    versions_served,
    wait_for_versions,
    write_stub_registry,
)

MODEL = "/v1/models/fashion-mnist"
CLASSIFY = "/v1/models/fashion-mnist:classify-png"
IMAGES = synthetic_images(np.array([0, 3, 7], dtype=np.uint8), seed=21)


def predict(app: TestClient, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return app.post(path, content=content, headers={"content-type": "application/json"})


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_tf_serving_requests_and_answers(app: TestClient, stub_registry: Registry) -> None:
    status = app.get("/v1/models/fashion-mnist")
    assert status.json() == {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    images = synthetic_images(np.array([0, 3, 7, 9], dtype=np.uint8), seed=11)
    expected = stub_probabilities(stub_registry, "v0001", images)
    instances = [
        images[0].tolist(),  # 28x28 integers: raw pixels
        (images[1].reshape(-1) / 255).tolist(),  # 784 floats in [0, 1]
        images[2].tolist(),
        images[3].reshape(-1).tolist(),  # 784 integers
    ]
    answer = app.post(PREDICT, json={"instances": instances})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "v0001"
    predictions = np.array(answer.json()["predictions"])
    assert predictions.shape == (4, 10) and np.abs(predictions - expected).max() <= 1e-5
    named = app.post(PREDICT, json={"instances": [{"images": image} for image in instances]})
    assert np.abs(np.array(named.json()["predictions"]) - expected).max() <= 1e-5  # the input named, as TF allows
    columnar = app.post(PREDICT, json={"inputs": [images[0].tolist()]})
    assert np.abs(np.array(columnar.json()["outputs"]) - expected[:1]).max() <= 1e-5
    metadata = app.get("/v1/models/fashion-mnist/metadata").json()
    signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["images"]["dtype"] == "DT_UINT8" and metadata["model_spec"]["version"] == "1"
    assert (
        metadata["fashion_mnist"]["metrics"]["test_accuracy"] == stub_registry.manifest("v0001").metrics.test_accuracy
    )
    assert app.get("/healthz").json() == {"status": "alive"}
    assert app.get("/readyz").json()["version"] == "v0001"


def test_png_uploads_are_classified(app: TestClient, stub_registry: Registry) -> None:
    images = synthetic_images(np.array([1, 8], dtype=np.uint8), seed=12)
    files = [("image", ("trouser.png", png_bytes(images[0]))), ("image", ("bag.png", png_bytes(images[1])))]
    answer = app.post(CLASSIFY, files=files)
    assert answer.status_code == 200, answer.text
    expected = stub_probabilities(stub_registry, "v0001", images)
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
def test_a_bad_predict_request_gets_an_error_that_names_the_problem(app: TestClient, case: str) -> None:
    body, status, message = BAD_PREDICT_BODIES[case]
    answer = app.post(PREDICT, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_bad_uploads_and_paths_get_errors_and_the_server_goes_on(app: TestClient) -> None:
    small = np.zeros((27, 27), np.uint8)
    cases = [
        ({"content": b"\x89PNG..."}, 400, "send the PNG files as multipart/form-data"),
        ({"files": [("image", ("notes.png", b"hello"))]}, 400, "notes.png: not a PNG image"),
        ({"files": [("image", ("small.png", png_bytes(small)))]}, 400, "small.png: image is 27x27; expected 28x28"),
        ({"data": {"comment": "no file"}, "files": [("x", ("x.png", b""))]}, 400, "form field 'comment' is not a file"),
        ({"files": [("image", ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(2 << 20)))]}, 400, "over the 1,048,576-byte"),
    ]
    for request, status, message in cases:
        answer = app.post(CLASSIFY, **request)
        assert answer.status_code == status and message in answer.json()["error"], (message, answer.text)
    answer = app.post("/v1/models/other:predict", json={"instances": [image_rows(0)]})
    assert answer.status_code == 404 and "Servable not found for request: Latest(other)" in answer.json()["error"]
    assert app.post(PREDICT, json={"instances": [image_rows(0)]}).status_code == 200


def test_versions_and_labels_answer_status_metadata_and_predict(
    app: TestClient, stub_registry: Registry, canary: str
) -> None:
    one = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    two = {**one, "version": "2"}
    assert app.get(f"{MODEL}").json() == {"model_version_status": [one, two]}
    for path, status in (("/versions/1", one), ("/versions/2", two), ("/labels/stable", one), ("/labels/canary", two)):
        assert app.get(f"{MODEL}{path}").json() == {"model_version_status": [status]}, path
        metadata = app.get(f"{MODEL}{path}/metadata").json()
        assert metadata["model_spec"] == {
            "name": "fashion-mnist",
            "version": status["version"],
            "signature_name": "serving_default",
        }
        signature = metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert signature["inputs"]["images"]["dtype"] == "DT_UINT8", path
    for path, version in (
        ("", "v0001"),
        ("/versions/1", "v0001"),
        ("/labels/stable", "v0001"),
        ("/versions/2", "v0002"),
        ("/labels/canary", "v0002"),
    ):
        answer = predict(
            app, f"{MODEL}{path}:predict", {"signature_name": "serving_default", "instances": IMAGES.tolist()}
        )
        assert answer.status_code == 200 and answer.headers["x-model-version"] == version, (path, answer.text)
        expected = stub_probabilities(stub_registry, version, IMAGES)
        assert np.abs(np.array(answer.json()["predictions"]) - expected).max() <= 1e-5, path
    assert (
        predict(app, "/V1/MODELS/fashion-mnist/LABELS/canary:PREDICT", {"instances": IMAGES.tolist()}).headers[
            "x-model-label"
        ]
        == "canary"
    )


def test_the_row_and_columnar_forms_named_and_unnamed_give_the_same_answer(
    app: TestClient, stub_registry: Registry
) -> None:
    expected = stub_probabilities(stub_registry, "v0001", IMAGES)
    flat = IMAGES.reshape(len(IMAGES), -1).tolist()
    bodies = {
        "rows": ({"instances": IMAGES.tolist()}, "predictions"),
        "rows, named": ({"instances": [{"images": image} for image in IMAGES.tolist()]}, "predictions"),
        "rows of 784": ({"instances": flat}, "predictions"),
        "columns": ({"inputs": IMAGES.tolist()}, "outputs"),
        "columns, named": ({"inputs": {"images": IMAGES.tolist()}}, "outputs"),
        "columns of 784, scaled": ({"inputs": {"images": (IMAGES.reshape(3, -1) / 255).tolist()}}, "outputs"),
        "empty signature name": ({"signature_name": "", "inputs": IMAGES.tolist()}, "outputs"),
    }
    for form, (body, key) in bodies.items():
        answer = predict(app, PREDICT, body)
        assert answer.status_code == 200 and list(answer.json()) == [key], (form, answer.text)
        assert np.abs(np.array(answer.json()[key]) - expected).max() <= 1e-5, form


IMAGE = image_rows(0)
REFUSED = {
    # TF Serving's http_rest_api_handler_test: paths
    "GET /v1/foo": ("GET", "/v1/foo", None, 400, "Malformed request"),
    "POST /v1/foo": ("POST", "/v1/foo", b"", 400, "Malformed request"),
    "GET /v1/models": ("GET", "/v1/models", None, 400, "Missing model name"),
    "GET a sub-path": ("GET", f"{MODEL}/debug/model_name", None, 400, "Malformed request"),
    "POST /v1/models": ("POST", "/v1/models", b"", 400, "Malformed request"),
    "GET predict": ("GET", f"{MODEL}:predict", None, 400, "Malformed request"),
    "version, not versions": ("POST", f"{MODEL}/version/1:predict", b"", 400, "Malformed request"),
    "a version that is no number": ("POST", f"{MODEL}/versions/HELLO:predict", b"", 400, "Malformed request"),
    "a version past int64": ("POST", f"{MODEL}/versions/{2**64}:predict", b"", 400, "Failed to convert version"),
    "POST metadata": ("POST", f"{MODEL}/metadata", b"", 400, "Malformed request"),
    "label, not labels": ("POST", f"{MODEL}/label/stable:predict", b"", 400, "Malformed request"),
    "a version and a label": ("POST", f"{MODEL}/versions/1/labels/stable:predict", b"", 400, "Malformed request"),
    "another model": (
        "POST",
        "/v1/models/foo:predict",
        {"instances": [IMAGE]},
        404,
        "Servable not found for request: Latest(foo)",
    ),
    "another model's version": (
        "POST",
        "/v1/models/foo/versions/50:predict",
        {"instances": [IMAGE]},
        404,
        "Specific(foo, 50)",
    ),
    "a version not served": (
        "POST",
        f"{MODEL}/versions/99:predict",
        {"instances": [IMAGE]},
        404,
        "Specific(fashion-mnist, 99)",
    ),
    "a version's status, not served": ("GET", f"{MODEL}/versions/99", None, 404, "Specific(fashion-mnist, 99)"),
    "an unknown label": (
        "POST",
        f"{MODEL}/labels/Version_Nonexistent:predict",
        {"instances": [IMAGE]},
        400,
        "Unrecognized servable version label",
    ),
    "an unknown label's metadata": (
        "GET",
        f"{MODEL}/labels/nope/metadata",
        None,
        400,
        "Unrecognized servable version label: nope",
    ),
    "classify": ("POST", f"{MODEL}:classify", {"examples": []}, 400, "a predict signature; use :predict"),
    "regress": ("POST", f"{MODEL}:regress", {"examples": []}, 400, "a predict signature; use :predict"),
    # its predict request errors
    "an empty document": ("POST", PREDICT, b"", 400, "JSON Parse error: The document is empty"),
    "badly formatted JSON": ("POST", PREDICT, b"instances = [1, 2]", 400, "JSON Parse error"),
    "strings for pixels": ("POST", PREDICT, {"instances": ["x", "y"]}, 400, "instance 0: pixels must be numbers"),
    "a signature name that is no string": (
        "POST",
        PREDICT,
        {"signature_name": 100},
        400,
        "'signature_name' key must be a string value.",
    ),
    "an unknown signature": (
        "POST",
        PREDICT,
        {"signature_name": "foo", "instances": [IMAGE]},
        400,
        'Serving signature name: "foo" not found in signature def',
    ),
    # json_tensor's
    "not an object": ("POST", PREDICT, [IMAGE], 400, "a predict request is an object"),
    "both forms": (
        "POST",
        PREDICT,
        {"instances": [IMAGE], "inputs": [IMAGE]},
        400,
        "only one of 'inputs' or 'instances'",
    ),
    "neither form": (
        "POST",
        PREDICT,
        {"signature_name": "serving_default"},
        400,
        "Missing 'inputs' or 'instances' key",
    ),
    "instances, not a list": ("POST", PREDICT, {"instances": {"images": IMAGE}}, 400, "'instances' must be a list"),
    "no instances": ("POST", PREDICT, {"instances": []}, 400, "No values in 'instances' array"),
    "a named instance after an unnamed one": (
        "POST",
        PREDICT,
        {"instances": [IMAGE, {"images": IMAGE}]},
        400,
        "Expecting value/list but got an object at item 1",
    ),
    "an unnamed instance after a named one": (
        "POST",
        PREDICT,
        {"instances": [{"images": IMAGE}, IMAGE]},
        400,
        "Expecting object but got a list at item 1",
    ),
    "an instance with another input's name": (
        "POST",
        PREDICT,
        {"instances": [{"pixels": IMAGE}]},
        400,
        "keys must be equal to: images",
    ),
    "an instance with an extra key": (
        "POST",
        PREDICT,
        {"instances": [{"images": IMAGE, "x": 1}]},
        400,
        "keys must be equal to: images",
    ),
    "columns missing their input": (
        "POST",
        PREDICT,
        {"inputs": {"pixels": [IMAGE]}},
        400,
        "Missing named input: images in 'inputs' object.",
    ),
    "columns of one image, no batch": ("POST", PREDICT, {"inputs": IMAGE[0]}, 400, "'inputs' must be a list of images"),
    "a ragged batch": ("POST", PREDICT, {"inputs": [IMAGE, IMAGE[:27]]}, 400, "image 1: expected 28x28"),
    # bad pixels
    "booleans": ("POST", PREDICT, {"instances": [image_rows(True)]}, 400, "instance 0: pixels must be numbers"),
    "a boolean among integers": (
        "POST",
        PREDICT,
        {"instances": [[[1] * 27 + [True]] * 28]},
        400,
        "instance 0: pixels must be numbers",
    ),
    "a boolean among floats": (
        "POST",
        PREDICT,
        {"instances": [IMAGE, [[0.5] * 27 + [False]] * 28]},
        400,
        "instance 1: pixels must be numbers",
    ),
    "null": ("POST", PREDICT, {"instances": [image_rows(None)]}, 400, "pixels must be numbers"),
    "objects for pixels": (
        "POST",
        PREDICT,
        {"instances": [[[{"b64": "AA=="}] * 28] * 28]},
        400,
        "pixels must be numbers",
    ),
    "a number for an image": ("POST", PREDICT, {"instances": [7]}, 400, "got a single number"),
    "too many images": (
        "POST",
        PREDICT,
        {"inputs": [[0] * 784] * (MAX_INSTANCES + 1)},
        400,
        f"at most {MAX_INSTANCES:,}",
    ),
    # hostile bodies
    "JSON nested 100,000 deep": ("POST", PREDICT, b"[" * 100_000 + b"]" * 100_000, 400, "nests more lists or objects"),
    "an object nested 2,000 deep": (
        "POST",
        PREDICT,
        b'{"a":' * 2_000 + b"1" + b"}" * 2_000,
        400,
        "nests more lists or objects",
    ),
    "JSON nested 2,000 deep in lists": (
        "POST",
        PREDICT,
        b'{"instances": ' + b"[" * 2_000 + b"]" * 2_000 + b"}",
        400,
        "JSON Parse error",
    ),
    "4 million empty lists": (
        "POST",
        PREDICT,
        b'{"instances": [' + b"[]," * (4 << 20) + b"[]]}",
        400,
        "nests more lists or objects",
    ),
    "invalid UTF-8": ("POST", PREDICT, b'{"instances": "\xff\xfe"}', 400, "JSON Parse error"),
    "a huge integer": ("POST", PREDICT, b'{"instances": [[' + b"9" * 400 + b"]]}", 400, "JSON Parse error"),
    # elsewhere
    "a path outside the API": ("GET", "/v2/models", None, 404, "no such endpoint"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_tf_serving_refuses_what_tf_serving_refuses_with_its_status_code(app: TestClient, case: str) -> None:
    method, path, body, status, message = REFUSED[case]
    answer = app.get(f"{path}") if method == "GET" else predict(app, path, body)
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"], answer.text[:300]


def test_a_canary_follows_its_label_and_a_label_on_a_version_that_does_not_verify_is_refused(
    app: TestClient, stub_registry: Registry, canary: str, capsys: pytest.CaptureFixture
) -> None:
    labels = Labels(stub_registry)
    with pytest.raises(RegistryError, match="'stable' is the champion's label"):
        labels.set("stable", "v0002", "no")
    with pytest.raises(RegistryError, match="a label is a lowercase letter"):
        labels.set("../x", "v0002", "no")
    with pytest.raises(RegistryError, match="no version 'v0009'"):
        labels.set("canary", "v0009", "no")
    assert cli.main(["--registry", stub_registry.root, "label", "canary", "v0001"]) == 0  # the canary moves to v0001
    wait_for_versions(app, ["1"])  # the canary moved onto the champion's version
    answer = predict(app, f"{MODEL}/labels/canary:predict", {"instances": [IMAGE]})
    assert answer.headers["x-model-version"] == "v0001" and answer.headers["x-model-label"] == "canary"
    # Someone edits labels.json by hand to name v0002 with a model hash it does not have: never served.
    record = {"version": "v0002", "model_sha256": "0" * 64, "at": "now", "reason": "by hand"}
    Path(labels.file).write_text(json.dumps({"canary": record}))
    time.sleep(4 * POLL_S)
    assert predict(app, f"{MODEL}/labels/canary:predict", {"instances": [IMAGE]}).headers["x-model-version"] == "v0001"
    Path(labels.file).write_text("{damaged")  # a damaged file: both labels keep serving what they had
    time.sleep(4 * POLL_S)
    assert versions_served(app) == ["1"] and app.get("/readyz").json()["version"] == "v0001"
    assert cli.main(["--registry", stub_registry.root, "label", "canary", "v0002"]) == 1  # would drop what it holds
    assert "`fashion-mnist label NAME --clear`" in capsys.readouterr().err
    assert cli.main(["--registry", stub_registry.root, "label", "canary", "--clear"]) == 0  # clears the damaged file
    assert cli.main(["--registry", stub_registry.root, "label", "canary", "v0002"]) == 0
    wait_for_versions(app, ["1", "2"])  # v0002 served as canary again
    capsys.readouterr()
    assert cli.main(["--registry", stub_registry.root, "versions"]) == 0
    assert "labels: canary v0002" in capsys.readouterr().out
    assert cli.main(["--registry", stub_registry.root, "labels"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "stable\tv0001\tthe champion",
        "canary\tv0002\tlabeled by the operator (" + labels.records()["canary"]["at"] + ")",
    ]


def test_prometheus_metrics_count_requests_refusals_classes_and_versions(
    app: TestClient, stub_registry: Registry, canary: str
) -> None:
    """(gRPC's calls, counted in the same metrics: test_serving_api.)"""
    before = metric_samples(app)
    for _ in range(3):
        assert predict(app, PREDICT, {"instances": IMAGES.tolist()}).status_code == 200
    assert predict(app, f"{MODEL}/labels/canary:predict", {"instances": IMAGES.tolist()}).status_code == 200
    assert predict(app, PREDICT, {"instances": []}).status_code == 400
    assert predict(app, f"{MODEL}/versions/9:predict", {"instances": [IMAGE]}).status_code == 404
    after = metric_samples(app)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    count = ":tensorflow:serving:request_count_total"  # the parser's name for TF Serving's counter
    assert grew(count, model_name="fashion-mnist", status="OK") == 4
    assert grew(count, model_name="fashion-mnist", status="INVALID_ARGUMENT") == 1
    assert grew(count, model_name="fashion-mnist", status="NOT_FOUND") == 1
    latency = ":tensorflow:serving:request_latency_count"
    assert grew(latency, model_name="fashion-mnist", API="predict", entrypoint="REST") == 6
    assert grew("fashion_mnist_refusals_total", reason="bad_request") == 1
    assert grew("fashion_mnist_refusals_total", reason="not_found") == 1
    expected = stub_probabilities(stub_registry, "v0001", IMAGES).argmax(axis=1)
    for index in set(expected):
        name = CLASS_NAMES[index]
        assert grew("fashion_mnist_predicted_class_total", label="stable", **{"class": name}) == 3 * list(
            expected
        ).count(index)
    assert grew("fashion_mnist_top_confidence_count", label="canary") == 3
    assert grew(":tensorflow:serving:batching_session:processed_batch_size_sum", model_name="fashion-mnist") == 12
    assert after[("fashion_mnist_served_version", (("label", "stable"),))] == 1
    assert after[("fashion_mnist_served_version", (("label", "canary"),))] == 2
    assert after[("fashion_mnist_model_loads_total", (("outcome", "loaded"),))] >= 2
    assert ("fashion_mnist_body_bytes_in_flight", ()) in after


def test_canary_share_routes_requests_and_shadow_mode_counts_agreement(stub_registry: Registry) -> None:
    Labels(stub_registry).set("canary", "v0002", "routed")
    try:
        with app_client(stub_registry, canary_share=0.5, shadow_share=1) as running:
            wait_for_versions(running, ["1", "2"])  # the canary served
            answers = [predict(running, PREDICT, {"instances": IMAGES.tolist()}) for _ in range(60)]
            routed = [a.headers["x-model-version"] for a in answers]
            assert {a.status_code for a in answers} == {200} and set(routed) == {"v0001", "v0002"}
            stable_requests = routed.count("v0001")
            agreement = stub_probabilities(stub_registry, "v0001", IMAGES).argmax(1) == stub_probabilities(
                stub_registry, "v0002", IMAGES
            ).argmax(1)
            deadline = time.monotonic() + 10
            while True:
                samples = metric_samples(running)
                yes = samples.get(("fashion_mnist_shadow_comparisons_total", (("agreed", "yes"),)), 0)
                no = samples.get(("fashion_mnist_shadow_comparisons_total", (("agreed", "no"),)), 0)
                if yes + no == 3 * stable_requests or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert (yes, no) == (stable_requests * agreement.sum(), stable_requests * (~agreement).sum())
    finally:
        Labels(stub_registry).clear("canary")


def slow_canary(registry: Registry, record: dict) -> tuple[ModelCall, str]:
    """The stub models, v0002's taking half a second a call (a canary still answering as the server stops)."""
    call, sha256 = load_stub_model(registry, record)
    if record["version"] != "v0002":
        return call, sha256

    def predict(images: np.ndarray) -> np.ndarray:
        time.sleep(0.5)
        return call(images)

    return predict, sha256


def test_a_shadow_call_in_flight_at_the_stop_is_finished_and_in_the_last_window(tmp_path: Path) -> None:
    registry = write_stub_registry(tmp_path)
    Labels(registry).set("canary", "v0002", "shadowed")
    with app_client(registry, load=slow_canary, shadow_share=1, evidence_window_s=60) as running:
        wait_for_versions(running, ["1", "2"])
        assert predict(running, PREDICT, {"instances": IMAGES.tolist()}).status_code == 200
    # Stopped at once: the shadow call was still running. (It vanished with the event loop before.)
    shadow = sum_windows(read_windows(registry.store, registry.root, "v0002", 0).windows)
    assert (shadow.images, np.sum(shadow.pairs["v0001"])) == (len(IMAGES), len(IMAGES))


def test_shadow_calls_still_running_after_the_stops_wait_are_cancelled_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    core = PredictionCore(models=None, metrics=None)  # (finishing shadows reads neither)

    async def stop() -> asyncio.Task:
        stuck = asyncio.get_running_loop().create_task(asyncio.sleep(60))  # a canary that never answers
        core.shadows.add(stuck)
        await core.finish_shadows(timeout_s=0.05)
        await asyncio.sleep(0)  # the cancellation delivered
        return stuck

    assert asyncio.run(stop()).cancelled()
    assert "1 shadow calls still running 0.05 s into the stop were dropped" in caplog.text


def test_a_damaged_pointer_keeps_the_version_in_service_and_the_server_follows_its_repair(
    app: TestClient, stub_registry: Registry
) -> None:
    served = app.get("/readyz").json()["version"]
    other = "v0002" if served == "v0001" else "v0001"
    Path(stub_registry.champion_file).write_text("{not json")
    time.sleep(4 * POLL_S)
    answer = app.post(PREDICT, json={"instances": [image_rows(0)]})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == served
    stub_registry.promote(other, "replaces the damaged pointer")  # the server still follows the pointer
    deadline = time.monotonic() + 30
    while app.get("/readyz").json()["version"] != other:
        assert time.monotonic() < deadline, f"still serving {served} 30 s after the pointer was repaired"
        time.sleep(0.2)


def test_a_champion_whose_model_does_not_verify_is_never_served(app: TestClient, stub_registry: Registry) -> None:
    served = app.get("/readyz").json()["version"]
    other = "v0002" if served == "v0001" else "v0001"
    # Someone swaps the other version's model and points champion.json at it by hand.
    stub_registry.store.write_bytes(join(stub_registry.version_dir(other), "model.keras"), b"not the registered model")
    model_sha256 = stub_registry.manifest(other).files["model.keras"]  # the pointer vouches for the registered model
    pointer = {**stub_registry.champion_record(), "version": other, "sequence": 99, "model_sha256": model_sha256}
    Path(stub_registry.champion_file).write_text(json.dumps(pointer))
    time.sleep(4 * POLL_S)
    answer = app.post(PREDICT, json={"instances": [image_rows(0)]})
    assert answer.status_code == 200 and answer.headers["x-model-version"] == served
    assert app.get("/readyz").json()["version"] == served
