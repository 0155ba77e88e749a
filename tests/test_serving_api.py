"""TF Serving's and KServe's clients against a real server process on trained Keras models: gRPC through
tensorflow-serving-api's own stubs (Keras' answers, by version and label, and TF Serving's refusals with its
codes), gRPC's calls in the Prometheus metrics, and tritonclient's HTTP client with binary tensors over a
real socket. REST's shapes, refusals, labels and metrics, in this process on stub models: test_serving_rest
and test_serving_kserve_rest."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tensorflow as tf
import tritonclient.http as triton
from google.protobuf import descriptor_pb2
from google.protobuf.json_format import MessageToDict
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from fmnist.data.dataset import CLASS_NAMES
from fmnist.registry.versions import Registry
from fmnist.serving import grpc_api, tfserving
from fmnist.serving.models import Served
from fmnist.serving.payloads import MAX_INSTANCES
from fmnist.serving.protos import tensorflow_serving
from tests.helpers import synthetic_images
from tests.processes import children, cmdline
from tests.serving_helpers import (
    PREDICT,
    RunningServer,
    image_rows,
    keras_probabilities,
    labeled_canary,
    metric_samples,
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
    with httpx.Client(base_url=server.url) as client, labeled_canary(registry, client):
        yield "v0002"


def predict(server: RunningServer, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})


IMAGES = synthetic_images(np.array([0, 3, 7], dtype=np.uint8), seed=21)


def test_rest_answers_are_tf_servings_messages_as_its_rest_api_prints_them(registry: Registry) -> None:
    """REST's answers are dicts (no TensorFlow in the REST path); gRPC's messages are parsed from them. Printed
    back as TF Serving's REST API prints a message, they are the same, field for field and in order."""
    served = Served("v0003", "0" * 64, registry.manifest("v0001"), batcher=None)

    def printed(message) -> str:
        as_dict = MessageToDict(message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)
        return json.dumps(as_dict)

    assert printed(grpc_api.status_message([served])) == json.dumps(tfserving.status_response([served]))
    loading = grpc_api.status_message([], "loading the champion")
    assert printed(loading) == json.dumps(tfserving.status_response([], "loading the champion"))
    metadata = grpc_api.metadata_message(served)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert metadata.metadata["signature_def"].Unpack(signatures)
    assert printed(signatures) == json.dumps(tfserving.signature_def_map())
    assert printed(metadata.model_spec) == json.dumps(tfserving.model_spec(served))


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


def test_the_tf_serving_definitions_the_server_speaks_are_the_installed_packages() -> None:
    """The server speaks TF Serving's messages from a file (`fmnist.serving.protos.tensorflow_serving`),
    without TensorFlow: it must be what the installed tensorflow-serving-api defines, file for file."""
    written = descriptor_pb2.FileDescriptorSet.FromString(tensorflow_serving.DESCRIPTOR_SET.read_bytes())
    installed = descriptor_pb2.FileDescriptorSet.FromString(tensorflow_serving.installed_descriptor_set())
    assert [f.name for f in written.file] == [f.name for f in installed.file]
    stale = f"{tensorflow_serving.DESCRIPTOR_SET} is stale: python -m {tensorflow_serving.__name__} writes it"
    assert written == installed, stale
    assert "tensorflow_serving/apis/prediction_service.proto" in [f.name for f in written.file]
    assert json.loads(tensorflow_serving.WRITTEN_FROM.read_text()) == tensorflow_serving.installed_versions()


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


def test_grpc_calls_are_counted_in_the_metrics_as_rest_calls_are(server: RunningServer, registry: Registry) -> None:
    with httpx.Client(base_url=server.url) as client, grpc.insecure_channel(server.grpc) as channel:
        before = metric_samples(client)
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(grpc_request(IMAGES), timeout=30)
        after = metric_samples(client)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew(":tensorflow:serving:request_count_total", model_name="fashion-mnist", status="OK") == 1
    latency = ":tensorflow:serving:request_latency_count"
    assert grew(latency, model_name="fashion-mnist", API="predict", entrypoint="GRPC") == 1
    expected = keras_probabilities(registry, "v0001", IMAGES).argmax(axis=1)
    for index in set(expected):
        name = CLASS_NAMES[index]
        assert grew("fashion_mnist_predicted_class_total", label="stable", **{"class": name}) == list(expected).count(
            index
        )
    assert grew(":tensorflow:serving:batching_session:processed_batch_size_sum", model_name="fashion-mnist") == 3


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


def test_a_killed_parse_worker_is_replaced_and_requests_go_on(server: RunningServer) -> None:
    """At the server's default deadlines: the hostile tests' 1 s head deadline measures the machine's load
    as much as the server when a new pool's processes start beside a loaded test run."""
    workers = parse_workers(server)
    assert workers, "no parse workers found"
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(0.5)
    big_body = json.dumps({"instances": [image_rows(1)] * 64}).encode()  # over 64 KB: parsed in a worker
    answers = [httpx.post(f"{server.url}{PREDICT}", content=big_body, timeout=30) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]  # (once: a 500 for good)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "never ready again after a parse worker died"
        time.sleep(0.2)
    replaced = parse_workers(server)
    assert len(replaced) == len(workers) and workers[0] not in replaced


def parse_workers(server: RunningServer) -> list[int]:
    return [pid for pid in children(server.process.pid) if b"spawn_main" in cmdline(pid)]
