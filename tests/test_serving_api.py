"""TF Serving's API as its clients call it, against a real server process: REST at /versions/N and
/labels/L, the row and columnar forms, TF Serving's refusals with its status codes (the cases of its
http_rest_api_handler_test and json_tensor); gRPC through tensorflow-serving-api's own stubs; a canary
labeled beside the champion, followed as the registry moves; and the Prometheus metrics, scraped and
parsed with prometheus-client's parser."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from fmnist.data.dataset import CLASS_NAMES
from fmnist.ops import cli
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry, RegistryError
from fmnist.serving.payloads import MAX_INSTANCES
from tests.helpers import synthetic_images
from tests.serving_helpers import (
    POLL_S,
    PREDICT,
    RunningServer,
    image_rows,
    keras_probabilities,
    running_server,
    two_version_registry,
)

pytestmark = pytest.mark.training

MODEL = "/v1/models/fashion-mnist"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return two_version_registry(tmp_path_factory.mktemp("serving-api"))


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(registry.root, tmp_path_factory.mktemp("server") / "serve.log") as running:
        yield running


@pytest.fixture()
def canary(registry: Registry, server: RunningServer) -> Iterator[str]:
    """v0002 labeled canary, and served as it; the label cleared after."""
    assert cli.main(["--registry", registry.root, "label", "canary", "v0002"]) == 0
    wait_for(server, lambda: versions_served(server) == ["1", "2"], "v0002 served as canary")
    yield "v0002"
    Labels(registry).clear("canary")
    wait_for(server, lambda: versions_served(server) == ["1"], "canary no longer served")


def wait_for(server: RunningServer, done, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s:\n{server.log.read_text()[-2000:]}"
        time.sleep(POLL_S / 2)


def versions_served(server: RunningServer) -> list[str]:
    status = httpx.get(f"{server.url}{MODEL}").json()["model_version_status"]
    return [s["version"] for s in status if s["state"] == "AVAILABLE"]


def predict(server: RunningServer, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})


IMAGES = synthetic_images(np.array([0, 3, 7], dtype=np.uint8), seed=21)


def test_versions_and_labels_answer_status_metadata_and_predict(
    server: RunningServer, registry: Registry, canary: str
) -> None:
    one = {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    two = {**one, "version": "2"}
    assert httpx.get(f"{server.url}{MODEL}").json() == {"model_version_status": [one, two]}
    for path, status in (("/versions/1", one), ("/versions/2", two), ("/labels/stable", one), ("/labels/canary", two)):
        assert httpx.get(f"{server.url}{MODEL}{path}").json() == {"model_version_status": [status]}, path
        metadata = httpx.get(f"{server.url}{MODEL}{path}/metadata").json()
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
            server, f"{MODEL}{path}:predict", {"signature_name": "serving_default", "instances": IMAGES.tolist()}
        )
        assert answer.status_code == 200 and answer.headers["x-model-version"] == version, (path, answer.text)
        expected = keras_probabilities(registry, version, IMAGES)
        assert np.abs(np.array(answer.json()["predictions"]) - expected).max() <= 1e-5, path
    assert (
        predict(server, "/V1/MODELS/fashion-mnist/LABELS/canary:PREDICT", {"instances": IMAGES.tolist()}).headers[
            "x-model-label"
        ]
        == "canary"
    )


def test_the_row_and_columnar_forms_named_and_unnamed_give_the_same_answer(
    server: RunningServer, registry: Registry
) -> None:
    expected = keras_probabilities(registry, "v0001", IMAGES)
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
        answer = predict(server, PREDICT, body)
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
def test_tf_serving_refuses_what_tf_serving_refuses_with_its_status_code(server: RunningServer, case: str) -> None:
    method, path, body, status, message = REFUSED[case]
    answer = httpx.get(f"{server.url}{path}") if method == "GET" else predict(server, path, body)
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == "application/json"
    assert message in answer.json()["error"], answer.text[:300]


def grpc_request(
    images: np.ndarray, *, label: str | None = None, version: int | None = None
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "fashion-mnist"
    request.model_spec.signature_name = "serving_default"
    if label is not None:
        request.model_spec.version_label = label
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def test_grpc_predict_metadata_and_status_through_tf_servings_own_stubs(
    server: RunningServer, registry: Registry, canary: str
) -> None:
    with grpc.insecure_channel(server.grpc) as channel:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        for options, version in (
            ({}, "v0001"),
            ({"version": 2}, "v0002"),
            ({"label": "canary"}, "v0002"),
            ({"label": "stable"}, "v0001"),
        ):
            expected = keras_probabilities(registry, version, IMAGES)
            for images in (IMAGES, IMAGES.astype(np.float32) / 255, IMAGES.reshape(3, 784)):
                response = prediction.Predict(grpc_request(images, **options), timeout=30)
                assert response.model_spec.version.value == int(version[1:]), options
                assert response.model_spec.signature_name == "serving_default"
                assert np.abs(tf.make_ndarray(response.outputs["probabilities"]) - expected).max() <= 1e-5, options

        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.name = "fashion-mnist"
        answer = prediction.GetModelMetadata(metadata, timeout=10)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        assert answer.metadata["signature_def"].Unpack(signatures) and answer.model_spec.version.value == 1
        assert list(signatures.signature_def["serving_default"].inputs) == ["images"]

        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "fashion-mnist"
        states = models.GetModelStatus(status, timeout=10).model_version_status
        assert [(s.version, s.state) for s in states] == [(1, 30), (2, 30)]  # AVAILABLE
        status.model_spec.version_label = "canary"
        assert [s.version for s in models.GetModelStatus(status, timeout=10).model_version_status] == [2]


def grpc_refusal(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        call(request, timeout=10)
    return refused.value.code(), refused.value.details()


def test_grpc_refuses_with_tf_servings_codes(server: RunningServer) -> None:
    with grpc.insecure_channel(server.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        cases = []
        other_model = grpc_request(IMAGES)
        other_model.model_spec.name = "other"
        cases.append((other_model, grpc.StatusCode.NOT_FOUND, "Latest(other)"))
        cases.append((grpc_request(IMAGES, version=7), grpc.StatusCode.NOT_FOUND, "Specific(fashion-mnist, 7)"))
        cases.append(
            (
                grpc_request(IMAGES, label="nope"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "Unrecognized servable version label",
            )
        )
        wrong_signature = grpc_request(IMAGES)
        wrong_signature.model_spec.signature_name = "classify"
        cases.append((wrong_signature, grpc.StatusCode.INVALID_ARGUMENT, 'signature name: "classify" not found'))
        wrong_input = grpc_request(IMAGES)
        wrong_input.inputs["pixels"].CopyFrom(wrong_input.inputs.pop("images"))
        cases.append(
            (wrong_input, grpc.StatusCode.INVALID_ARGUMENT, "input tensor alias not found in signature: pixels")
        )
        cases.append((grpc_request(IMAGES[:, :27]), grpc.StatusCode.INVALID_ARGUMENT, "expected shape [n, 28, 28]"))
        cases.append((grpc_request(IMAGES.astype(np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "expects uint8"))
        cases.append(
            (
                grpc_request(np.full((1, 28, 28), 2.0, np.float32)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "float pixels must be in [0, 1]",
            )
        )
        lying = grpc_request(IMAGES)  # claims 1,024 images, carries 3
        lying.inputs["images"].tensor_shape.dim[0].size = MAX_INSTANCES
        cases.append((lying, grpc.StatusCode.INVALID_ARGUMENT, "bytes of content for shape"))
        too_many = grpc_request(np.zeros((MAX_INSTANCES + 1, 28, 28), np.uint8))
        cases.append((too_many, grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_INSTANCES:,}"))
        filtered = grpc_request(IMAGES)
        filtered.output_filter.append("logits")
        cases.append((filtered, grpc.StatusCode.INVALID_ARGUMENT, "output tensor alias not found in signature: logits"))
        for request, code, message in cases:
            got_code, details = grpc_refusal(stub.Predict, request)
            assert got_code == code and message in details, (code, message, got_code, details)
        no_field = get_model_metadata_pb2.GetModelMetadataRequest()
        no_field.model_spec.name = "fashion-mnist"
        assert grpc_refusal(stub.GetModelMetadata, no_field)[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert grpc_refusal(stub.Classify, predict_pb2.PredictRequest())[0] == grpc.StatusCode.UNIMPLEMENTED


def test_a_canary_follows_its_label_and_a_label_on_a_version_that_does_not_verify_is_refused(
    server: RunningServer, registry: Registry, canary: str, capsys: pytest.CaptureFixture
) -> None:
    labels = Labels(registry)
    with pytest.raises(RegistryError, match="'stable' is the champion's label"):
        labels.set("stable", "v0002", "no")
    with pytest.raises(RegistryError, match="a label is a lowercase letter"):
        labels.set("../x", "v0002", "no")
    with pytest.raises(RegistryError, match="no version 'v0009'"):
        labels.set("canary", "v0009", "no")
    assert cli.main(["--registry", registry.root, "label", "canary", "v0001"]) == 0  # the canary moves to v0001
    wait_for(server, lambda: versions_served(server) == ["1"], "the canary moved onto the champion's version")
    answer = predict(server, f"{MODEL}/labels/canary:predict", {"instances": [IMAGE]})
    assert answer.headers["x-model-version"] == "v0001" and answer.headers["x-model-label"] == "canary"
    # Someone edits labels.json by hand to name v0002 with a model hash it does not have: never served.
    record = {"version": "v0002", "model_sha256": "0" * 64, "at": "now", "reason": "by hand"}
    Path(labels.file).write_text(json.dumps({"canary": record}))
    time.sleep(4 * POLL_S)
    assert (
        predict(server, f"{MODEL}/labels/canary:predict", {"instances": [IMAGE]}).headers["x-model-version"] == "v0001"
    )
    Path(labels.file).write_text("{damaged")  # a damaged file: both labels keep serving what they had
    time.sleep(4 * POLL_S)
    assert versions_served(server) == ["1"] and httpx.get(f"{server.url}/readyz").json()["version"] == "v0001"
    assert cli.main(["--registry", registry.root, "label", "canary", "v0002"]) == 1  # would drop what it holds
    assert "`fashion-mnist label NAME --clear`" in capsys.readouterr().err
    assert cli.main(["--registry", registry.root, "label", "canary", "--clear"]) == 0  # clears the damaged file
    assert cli.main(["--registry", registry.root, "label", "canary", "v0002"]) == 0
    wait_for(server, lambda: versions_served(server) == ["1", "2"], "v0002 served as canary again")
    capsys.readouterr()
    assert cli.main(["--registry", registry.root, "versions"]) == 0
    assert "labels: canary v0002" in capsys.readouterr().out
    assert cli.main(["--registry", registry.root, "labels"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "stable\tv0001\tthe champion",
        "canary\tv0002\tlabeled by the operator (" + labels.records()["canary"]["at"] + ")",
    ]


def metric_samples(server: RunningServer) -> dict[tuple[str, tuple], float]:
    page = httpx.get(f"{server.url}/monitoring/prometheus/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(page.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_prometheus_metrics_count_requests_refusals_classes_and_versions(
    server: RunningServer, registry: Registry, canary: str
) -> None:
    before = metric_samples(server)
    for _ in range(3):
        assert predict(server, PREDICT, {"instances": IMAGES.tolist()}).status_code == 200
    assert predict(server, f"{MODEL}/labels/canary:predict", {"instances": IMAGES.tolist()}).status_code == 200
    assert predict(server, PREDICT, {"instances": []}).status_code == 400
    assert predict(server, f"{MODEL}/versions/9:predict", {"instances": [IMAGE]}).status_code == 404
    with grpc.insecure_channel(server.grpc) as channel:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(grpc_request(IMAGES), timeout=30)
    after = metric_samples(server)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    count = ":tensorflow:serving:request_count_total"  # the parser's name for TF Serving's counter
    assert grew(count, model_name="fashion-mnist", status="OK") == 5
    assert grew(count, model_name="fashion-mnist", status="INVALID_ARGUMENT") == 1
    assert grew(count, model_name="fashion-mnist", status="NOT_FOUND") == 1
    latency = ":tensorflow:serving:request_latency_count"
    assert grew(latency, model_name="fashion-mnist", API="predict", entrypoint="REST") == 6
    assert grew(latency, model_name="fashion-mnist", API="predict", entrypoint="GRPC") == 1
    assert grew("fashion_mnist_refusals_total", reason="bad_request") == 1
    assert grew("fashion_mnist_refusals_total", reason="not_found") == 1
    expected = keras_probabilities(registry, "v0001", IMAGES).argmax(axis=1)
    for index in set(expected):
        name = CLASS_NAMES[index]
        assert grew("fashion_mnist_predicted_class_total", label="stable", **{"class": name}) == 4 * list(
            expected
        ).count(index)
    assert grew("fashion_mnist_top_confidence_count", label="canary") == 3
    assert grew(":tensorflow:serving:batching_session:processed_batch_size_sum", model_name="fashion-mnist") == 15
    assert after[("fashion_mnist_served_version", (("label", "stable"),))] == 1
    assert after[("fashion_mnist_served_version", (("label", "canary"),))] == 2
    assert after[("fashion_mnist_model_loads_total", (("outcome", "loaded"),))] >= 2
    assert ("fashion_mnist_body_bytes_in_flight", ()) in after


def test_canary_share_routes_requests_and_shadow_mode_counts_agreement(registry: Registry, tmp_path: Path) -> None:
    Labels(registry).set("canary", "v0002", "routed")
    try:
        options = ("--canary-share", "0.5", "--shadow-share", "1")
        with running_server(registry.root, tmp_path / "serve.log", None, *options) as running:
            wait_for(running, lambda: versions_served(running) == ["1", "2"], "the canary served")
            answers = [predict(running, PREDICT, {"instances": IMAGES.tolist()}) for _ in range(60)]
            routed = [a.headers["x-model-version"] for a in answers]
            assert {a.status_code for a in answers} == {200} and set(routed) == {"v0001", "v0002"}
            stable_requests = routed.count("v0001")
            agreement = keras_probabilities(registry, "v0001", IMAGES).argmax(1) == keras_probabilities(
                registry, "v0002", IMAGES
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
        Labels(registry).clear("canary")


def test_the_open_inference_protocol_infers_with_either_version(
    server: RunningServer, registry: Registry, canary: str
) -> None:
    v2 = f"{server.url}/v2"
    assert httpx.get(f"{v2}/health/live").json() == {"live": True}
    assert httpx.get(f"{v2}/health/ready").json() == {"ready": True}
    metadata = httpx.get(f"{v2}/models/fashion-mnist").json()
    assert metadata["versions"] == ["1", "2"] and metadata["inputs"][0]["name"] == "images"
    assert httpx.get(f"{v2}/models/fashion-mnist/versions/2/ready").json() == {"name": "fashion-mnist", "ready": True}
    for path, version in (("", "v0001"), ("/versions/2", "v0002")):
        expected = keras_probabilities(registry, version, IMAGES)
        for datatype, data in (("UINT8", IMAGES.reshape(-1).tolist()), ("FP32", (IMAGES / 255).tolist())):
            body = {
                "id": "r-7",
                "inputs": [{"name": "images", "shape": [3, 28, 28], "datatype": datatype, "data": data}],
            }
            answer = httpx.post(f"{v2}/models/fashion-mnist{path}/infer", json=body)
            assert answer.status_code == 200, answer.text
            output = answer.json()
            assert output["model_version"] == version[1:].lstrip("0") and output["id"] == "r-7"
            [tensor] = output["outputs"]
            assert tensor["name"] == "probabilities" and tensor["shape"] == [3, 10] and tensor["datatype"] == "FP32"
            assert np.abs(np.array(tensor["data"]).reshape(3, 10) - expected).max() <= 1e-5


V2_REFUSED = {
    "not JSON": (b"{", 400, "not JSON"),
    "no inputs": ({"outputs": []}, 400, 'an object with "inputs"'),
    "another input": (
        {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]},
        400,
        'named "images"',
    ),
    "a string datatype": (
        {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "BYTES", "data": ["a"]}]},
        400,
        "datatype 'BYTES'",
    ),
    "a wrong shape": (
        {"inputs": [{"name": "images", "shape": [1, 27, 28], "datatype": "UINT8", "data": [0] * 756}]},
        400,
        "expected shape",
    ),
    "a shape its data do not fill": (
        {"inputs": [{"name": "images", "shape": [2, 784], "datatype": "UINT8", "data": [0] * 784}]},
        400,
        "784 values for shape [2, 784]",
    ),
    "booleans": (
        {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [True] * 784}]},
        400,
        "data must be numbers",
    ),
    "floats as UINT8": (
        {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0.5] * 784}]},
        400,
        "integers 0..255",
    ),
    "FP32 over 1": (
        {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "FP32", "data": [2.0] * 784}]},
        400,
        "in [0, 1]",
    ),
    "an unknown output": (
        {
            "inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}],
            "outputs": [{"name": "logits"}],
        },
        400,
        "unknown output 'logits'",
    ),
    # each of these was a plain-text 500
    "outputs that are not a list": (
        {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}], "outputs": 5},
        400,
        '"outputs" must be a list',
    ),
    "an output named by a list": (
        {
            "inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}],
            "outputs": [{"name": [1]}],
        },
        400,
        '"outputs" must be a list',
    ),
    "a datatype that is an object": (
        {"inputs": [{"name": "images", "shape": [1, 784], "datatype": {"a": 1}, "data": [0] * 784}]},
        400,
        "datatype",
    ),
    "an empty body": (b"", 400, "the JSON request is empty"),
    "a compressed body": (b"\x1f\x8b", 400, "Content-Encoding"),
}


@pytest.mark.parametrize("case", V2_REFUSED, ids=list(V2_REFUSED))
def test_the_open_inference_protocol_refuses_bad_requests(server: RunningServer, case: str) -> None:
    body, status, message = V2_REFUSED[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-encoding": "gzip"} if content.startswith(b"\x1f\x8b") else {}
    answer = httpx.post(f"{server.url}/v2/models/fashion-mnist/infer", content=content, headers=headers)
    assert answer.status_code == status and message in answer.json()["error"], answer.text[:300]
    assert httpx.post(f"{server.url}/v2/models/other/infer", content=content).status_code == 404
    assert httpx.get(f"{server.url}/v2/models/fashion-mnist/versions/9").status_code == 404


def json_path_probabilities(server: RunningServer, images: np.ndarray) -> np.ndarray:
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8", "data": images.ravel().tolist()}
    answer = httpx.post(f"{server.url}/v2/models/fashion-mnist/infer", json={"inputs": [tensor]})
    assert answer.status_code == 200, answer.text
    [output] = answer.json()["outputs"]
    return np.array(output["data"], np.float32).reshape(output["shape"])


def test_tritonclient_speaks_to_the_server_with_binary_tensors(server: RunningServer) -> None:
    """tritonclient's HTTP client with its defaults: tensors sent as binary data, answers asked for as binary."""
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    server_metadata = client.get_server_metadata()
    assert set(server_metadata) == {"name", "version", "extensions"} and server_metadata["version"]
    assert server_metadata["name"] == "fashion-mnist-serve" and server_metadata["extensions"] == ["binary_tensor_data"]
    assert client.is_model_ready("fashion-mnist") and client.is_model_ready("fashion-mnist", "1")
    assert not client.is_model_ready("fashion-mnist", "9")
    metadata = client.get_model_metadata("fashion-mnist", "1")
    assert metadata["versions"] == ["1"] and metadata["inputs"][0] == {
        "name": "images",
        "datatype": "UINT8",
        "shape": [-1, 28, 28],
    }
    expected = json_path_probabilities(server, IMAGES)
    for datatype, pixels in (("UINT8", IMAGES), ("FP32", (IMAGES / np.float32(255)).astype(np.float32))):
        tensor = triton.InferInput("images", list(pixels.shape), datatype)
        tensor.set_data_from_numpy(pixels)
        for binary_output in (True, False):
            outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary_output)]
            result = client.infer("fashion-mnist", [tensor], outputs=outputs, request_id="r-7")
            [output] = result.get_response()["outputs"]
            assert ("data" in output) is not binary_output, (datatype, output)
            assert result.get_response()["id"] == "r-7" and result.get_response()["model_version"] == "1"
            assert np.abs(result.as_numpy("probabilities") - expected).max() <= 1e-6, (datatype, binary_output)
        default = client.infer("fashion-mnist", [tensor])  # no outputs named: all of them, as binary
        assert default.get_response()["outputs"][0]["parameters"] == {"binary_data_size": expected.nbytes}
        assert np.abs(default.as_numpy("probabilities") - expected).max() <= 1e-6, datatype


def binary_request(size, shape: list[int] | None = None, tensor_bytes: bytes | None = None) -> tuple[bytes, int]:
    """A request for IMAGES (or `tensor_bytes`) as binary data, claiming `size` bytes; and its JSON's length."""
    tensor = {"name": "images", "shape": shape or [3, 28, 28], "datatype": "UINT8"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": size}}]}).encode()
    return header + (IMAGES.tobytes() if tensor_bytes is None else tensor_bytes), len(header)


def with_header_length(body_and_length: tuple[bytes, int], length: str | None = None) -> tuple[bytes, str]:
    body, header_length = body_and_length
    return body, str(header_length) if length is None else length


BINARY_LIES = {
    "the header length past the body": (
        with_header_length(binary_request(2352), "100000"),
        "Inference-Header-Content-Length is 100,000, past the body's end",
    ),
    "a negative header length": (with_header_length(binary_request(2352), "-1"), "must be a byte count"),
    "a header length of 300 digits": (with_header_length(binary_request(2352), "9" * 300), "must be a byte count"),
    "binary_data_size past the end": (with_header_length(binary_request(2353)), "past the body's end"),
    "binary_data_size past 64 bits": (with_header_length(binary_request(1 << 62)), "past the body's end"),
    "binary_data_size not the shape's": (
        with_header_length(binary_request(784, tensor_bytes=IMAGES[:1].tobytes())),
        "binary_data_size 784 for shape [3, 28, 28] of UINT8 (2,352 bytes)",
    ),
    "a negative binary_data_size": (with_header_length(binary_request(-1)), "got -1"),
    "a negative image count": (
        with_header_length(binary_request(2352, shape=[-3, 28, 28])),
        "expected shape [n, 28, 28] or [n, 784]; got [-3, 28, 28]",
    ),
    "bytes no input claims": (
        with_header_length(binary_request(2352, tensor_bytes=IMAGES.tobytes() + b"\0")),
        "1 bytes after the input's binary data",
    ),
}


@pytest.mark.parametrize("case", BINARY_LIES, ids=list(BINARY_LIES))
def test_the_binary_extensions_lies_are_refused(server: RunningServer, case: str) -> None:
    (body, header_length), message = BINARY_LIES[case]
    answer = httpx.post(
        f"{server.url}/v2/models/fashion-mnist/infer",
        content=body,
        headers={"inference-header-content-length": header_length, "content-type": "application/octet-stream"},
    )
    assert answer.status_code == 400 and answer.headers["content-type"] == "application/json", answer.text[:300]
    assert message in answer.json()["error"], answer.text[:300]


V2_PATHS = {
    "the server's metadata": ("/v2", 200, None),
    "a version that is a float": ("/v2/models/fashion-mnist/versions/1e999", 404, "Servable not found"),
    "a negative version": ("/v2/models/fashion-mnist/versions/-1", 404, "Servable not found"),
    "a superscript version": ("/v2/models/fashion-mnist/versions/%C2%B2", 404, "Servable not found"),  # was a 500
    "a version of 300 digits": ("/v2/models/fashion-mnist/versions/" + "9" * 300, 400, "Failed to convert version"),
    "a version of 5,000 digits": (  # was a 500: int() refuses strings over 4,300 digits
        "/v2/models/fashion-mnist/versions/" + "9" * 5000 + "/infer",
        400,
        "Failed to convert version",
    ),
    "a model named in unicode": ("/v2/models/%E2%98%83/ready", 404, "Servable not found"),
    "no model": ("/v2/models", 404, "no such endpoint"),
}


@pytest.mark.parametrize("case", V2_PATHS, ids=list(V2_PATHS))
def test_open_inference_paths_answer_json(server: RunningServer, case: str) -> None:
    path, status, message = V2_PATHS[case]
    answer = httpx.get(f"{server.url}{path}")
    assert answer.status_code == status and answer.headers["content-type"] == "application/json", answer.text[:300]
    assert message is None or message in answer.json()["error"], answer.text[:300]
