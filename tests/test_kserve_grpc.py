"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`): its messages read and
answered as plain functions (no server, no TensorFlow), every claim a ModelInferRequest can lie with
refused; then a real server, called through grpc's generic stubs with the committed messages and
compared with its REST answers, and through tritonclient's gRPC client as Triton's users call it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fmnist.serving import kserve
from fmnist.serving.errors import BadRequest
from fmnist.serving.kserve_grpc_messages import (
    CONTENTS,
    empty_call,
    infer_call,
    infer_response,
    model_metadata,
    model_ready_call,
    server_metadata,
)
from fmnist.serving.payloads import MAX_INSTANCES
from fmnist.serving.protos import grpc_predict_v2_pb2 as v2
from fmnist.serving.protos import tensorflow_serving
from fmnist.serving.workers import INLINE_BYTES, BodyParsers
from tests.helpers import ROOT, synthetic_images
from tests.serving_helpers import RunningServer, running_server, two_version_registry

IMAGES = synthetic_images(np.array([0, 3, 7], dtype=np.uint8), seed=21)
SCALED = (IMAGES / np.float32(255)).astype(np.float32)
# Each datatype the REST path takes, with pixels in it.
PIXELS = {
    "UINT8": IMAGES,
    "UINT16": IMAGES.astype("<u2"),
    "UINT32": IMAGES.astype("<u4"),
    "UINT64": IMAGES.astype("<u8"),
    "INT8": (IMAGES // 2).astype("<i1"),
    "INT16": IMAGES.astype("<i2"),
    "INT32": IMAGES.astype("<i4"),
    "INT64": IMAGES.astype("<i8"),
    "FP16": SCALED.astype("<f2"),
    "FP32": SCALED,
    "FP64": SCALED.astype("<f8"),
}


def infer_request(
    pixels: np.ndarray, datatype: str, *, raw: bool = True, shape: list[int] | None = None, **fields
) -> v2.ModelInferRequest:
    """A request as a client builds it: the pixels raw (tritonclient's way) or in their contents field."""
    request = v2.ModelInferRequest(**{"model_name": "fashion-mnist", **fields})
    tensor = request.inputs.add(name="images", datatype=datatype, shape=shape or list(pixels.shape))
    if raw:
        request.raw_input_contents.append(pixels.astype(kserve.BINARY_LAYOUT[datatype]).tobytes())
    else:
        getattr(tensor.contents, CONTENTS[datatype][0]).extend(pixels.ravel().tolist())
    return request


def rest_images(pixels: np.ndarray, datatype: str) -> np.ndarray:
    """What the REST path makes of the same pixels sent as JSON."""
    tensor = {"name": "images", "shape": list(pixels.shape), "datatype": datatype, "data": pixels.ravel().tolist()}
    return kserve.parse_infer(json.dumps({"inputs": [tensor]}).encode()).images


@pytest.mark.parametrize("datatype", PIXELS)
def test_raw_and_contents_give_the_rest_paths_images(datatype: str) -> None:
    pixels = PIXELS[datatype]
    expected = rest_images(pixels, datatype)
    raw = infer_call(infer_request(pixels, datatype).SerializeToString())
    np.testing.assert_array_equal(raw.images, expected)
    assert raw.raw and raw.images.dtype == np.float32 and raw.images.shape == (3, 28, 28)
    if datatype != "FP16":  # no contents field: raw only
        flat = pixels.reshape(3, 784)
        contents = infer_call(infer_request(flat, datatype, raw=False).SerializeToString())
        np.testing.assert_array_equal(contents.images, expected)
        assert not contents.raw


def test_the_call_carries_what_the_answer_echoes() -> None:
    request = infer_request(IMAGES, "UINT8", model_version="1", id="r-7")
    call = infer_call(request.SerializeToString())
    assert (call.name, call.version, call.id) == ("fashion-mnist", "1", "r-7")
    asked = infer_request(
        IMAGES, "UINT8", outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")]
    )
    asked.parameters["priority"].int64_param = 3  # a parameter of no extension: ignored, as Triton's are
    np.testing.assert_array_equal(infer_call(asked.SerializeToString()).images, call.images)


def refused_request(change: Callable[[v2.ModelInferRequest], object]) -> bytes:
    request = infer_request(IMAGES, "UINT8")
    change(request)
    return request.SerializeToString()


def set_shape(request: v2.ModelInferRequest, shape: list[int]) -> None:
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend(shape)


def as_contents(request: v2.ModelInferRequest, field: str, values: list, datatype: str = "UINT8") -> None:
    del request.raw_input_contents[:]
    request.inputs[0].datatype = datatype
    getattr(request.inputs[0].contents, field).extend(values)


def shared_memory_input(request: v2.ModelInferRequest) -> None:
    request.inputs[0].parameters["shared_memory_region"].string_param = "region-0"


def classified_output(request: v2.ModelInferRequest) -> None:
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3


def two_outputs(request: v2.ModelInferRequest) -> None:
    request.outputs.add(name="probabilities")
    request.outputs.add(name="probabilities")


# Each lie or mistake, and the words the refusal names it with (every one INVALID_ARGUMENT).
REFUSED = {
    "not a message": (b"\xff\xff\xff", "not a ModelInferRequest message"),
    "no input": (refused_request(lambda r: r.ClearField("inputs")), 'one input tensor, named "images"'),
    "another input": (refused_request(lambda r: setattr(r.inputs[0], "name", "x")), 'named "images"'),
    "two inputs": (refused_request(lambda r: r.inputs.add(name="images")), 'one input tensor, named "images"'),
    "an unknown output": (refused_request(lambda r: r.outputs.add(name="logits")), "unknown output 'logits'"),
    "two outputs": (refused_request(two_outputs), "2 outputs asked for"),
    "a string datatype": (refused_request(lambda r: setattr(r.inputs[0], "datatype", "BYTES")), "datatype 'BYTES'"),
    "no datatype": (refused_request(lambda r: setattr(r.inputs[0], "datatype", "")), "datatype ''"),
    "a shape of one dimension": (refused_request(lambda r: set_shape(r, [2352])), "got 1 dimensions"),
    "a shape of a million dimensions": (refused_request(lambda r: set_shape(r, [1] * 10**6)), "1,000,000 dimensions"),
    "a wrong image shape": (refused_request(lambda r: set_shape(r, [3, 27, 28])), "expected shape [n, 28, 28]"),
    "no images": (refused_request(lambda r: set_shape(r, [0, 784])), "expected shape"),
    "a negative count": (refused_request(lambda r: set_shape(r, [-1, 784])), "expected shape"),
    "a huge count": (refused_request(lambda r: set_shape(r, [2**62, 784])), f"at most {MAX_INSTANCES:,}"),
    "one image too many": (refused_request(lambda r: set_shape(r, [MAX_INSTANCES + 1, 784])), "at most"),
    "raw bytes short of the shape": (
        refused_request(lambda r: set_shape(r, [4, 784])),
        "2,352 bytes of raw_input_contents for shape [4, 784] of UINT8 (3,136 bytes)",
    ),
    "raw bytes past the shape": (
        refused_request(lambda r: set_shape(r, [2, 784])),
        "2,352 bytes of raw_input_contents for shape [2, 784]",
    ),
    "raw bytes for another datatype": (
        refused_request(lambda r: setattr(r.inputs[0], "datatype", "FP32")),
        "of FP32 (9,408 bytes)",
    ),
    "two raw contents": (refused_request(lambda r: r.raw_input_contents.append(b"")), "2 raw_input_contents"),
    "raw and contents both": (
        refused_request(lambda r: r.inputs[0].contents.uint_contents.append(0)),
        "both contents and raw_input_contents",
    ),
    "contents short of the shape": (
        refused_request(lambda r: as_contents(r, "uint_contents", [0] * 784)),
        "784 values in contents.uint_contents for shape [3, 28, 28] (2,352)",
    ),
    "no pixels at all": (refused_request(lambda r: r.ClearField("raw_input_contents")), "0 values in contents"),
    "contents in another datatype's field": (
        refused_request(lambda r: as_contents(r, "fp32_contents", [0.0] * 2352)),
        "UINT8 values go in contents.uint_contents; got fp32_contents",
    ),
    "FP16 contents": (
        refused_request(lambda r: as_contents(r, "fp32_contents", [0.0] * 2352, "FP16")),
        "FP16 has no contents field",
    ),
    "UINT8 values past 255": (refused_request(lambda r: as_contents(r, "uint_contents", [256] * 2352)), "0..255"),
    "negative INT32 values": (
        refused_request(lambda r: as_contents(r, "int_contents", [-1] * 2352, "INT32")),
        "0..255",
    ),
    "FP32 over 1": (
        refused_request(lambda r: as_contents(r, "fp32_contents", [2.0] * 2352, "FP32")),
        "in [0, 1]",
    ),
    "FP32 NaN": (
        refused_request(lambda r: as_contents(r, "fp32_contents", [float("nan")] * 2352, "FP32")),
        "finite",
    ),
    "shared memory": (
        refused_request(shared_memory_input),
        "images: 'shared_memory_region' belongs to an extension",
    ),
    "classification": (
        refused_request(classified_output),
        "probabilities: 'classification' belongs to an extension",
    ),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_every_claim_of_an_infer_request_is_checked(case: str) -> None:
    raw, message = REFUSED[case]
    with pytest.raises(BadRequest) as refused:
        infer_call(raw)
    assert message in str(refused.value)


def test_the_answer_goes_back_raw_for_a_raw_request_else_in_contents() -> None:
    probabilities = np.random.default_rng(3).random((3, 10), np.float32)
    for raw in (True, False):
        response = v2.ModelInferResponse.FromString(
            infer_response("fashion-mnist", 2, "r-7", probabilities, raw).SerializeToString()
        )
        assert (response.model_name, response.model_version, response.id) == ("fashion-mnist", "2", "r-7")
        [output] = response.outputs
        assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [3, 10])
        if raw:
            assert not output.contents.fp32_contents
            values = np.frombuffer(response.raw_output_contents[0], "<f4")
        else:
            assert not response.raw_output_contents
            values = np.array(output.contents.fp32_contents, np.float32)
        np.testing.assert_array_equal(values.reshape(3, 10), probabilities)


def test_metadata_says_what_rest_says() -> None:
    assert json_of(server_metadata()) == kserve.server_metadata()
    assert json_of(model_metadata("fashion-mnist", [1, 2])) == kserve.metadata("fashion-mnist", [1, 2])


def json_of(message) -> dict:
    """A metadata message as REST's JSON (int64 shapes as numbers)."""
    answer = MessageToDict(message, preserving_proto_field_name=True)
    for tensor in (*answer.get("inputs", []), *answer.get("outputs", [])):
        tensor["shape"] = [int(d) for d in tensor["shape"]]
    return answer


def test_the_small_requests_are_messages_or_refused() -> None:
    assert empty_call("inference.ServerLiveRequest", b"") is None
    ready = model_ready_call(v2.ModelReadyRequest(name="fashion-mnist", version="1").SerializeToString())
    assert (ready.name, ready.version) == ("fashion-mnist", "1")
    with pytest.raises(BadRequest, match="not a ServerReadyRequest message"):
        empty_call("inference.ServerReadyRequest", b"\x0a\xff")


def test_the_messages_modules_import_no_tensorflow() -> None:
    """Their functions run in the body parsers' worker processes, which must not load TensorFlow; nor need
    TF Serving's gRPC API, whose messages come from their definitions (`fmnist.serving.protos`)."""
    modules = "fmnist.serving.kserve_grpc_messages, fmnist.serving.grpc_messages, fmnist.serving.grpc_api"
    probe = f"import sys, {modules}; print(sorted({{'tensorflow', 'keras'}} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_tf_servings_definitions_are_used_only_as_the_installed_packages_wrote_them(tmp_path, monkeypatch) -> None:
    """A stale set in protobuf's pool would stop TensorFlow's import (its files added twice, differently), and
    an unreadable one would fail every call: either is refused, naming the file and how to write it again
    (`load` then takes tensorflow-serving-api's own modules)."""
    assert [f.name for f in tensorflow_serving._written_files()][-1] == "tensorflow_serving/apis/model_service.proto"
    other = tmp_path / "written-from.json"
    other.write_text(json.dumps(tensorflow_serving.installed_versions() | {"tensorflow": "2.0.0"}))
    monkeypatch.setattr(tensorflow_serving, "WRITTEN_FROM", other)
    with pytest.raises(ValueError, match=r"tensorflow_serving.binpb was written from .*'2.0.0'.* writes it again"):
        tensorflow_serving._written_files()
    torn = tmp_path / "torn.binpb"
    torn.write_bytes(tensorflow_serving.DESCRIPTOR_SET.read_bytes()[:1000])
    monkeypatch.setattr(tensorflow_serving, "DESCRIPTOR_SET", torn)
    with pytest.raises(ValueError, match=r"torn.binpb or .*: unreadable .* writes it again"):
        tensorflow_serving._written_files()


def test_a_big_message_is_parsed_in_a_worker_process_and_its_refusal_crosses_back() -> None:
    big = infer_request(np.tile(SCALED, (40, 1, 1)), "FP32")  # 120 images: 376 KB
    lying = infer_request(np.tile(SCALED, (40, 1, 1)), "FP32", shape=[121, 784])
    assert big.ByteSize() > INLINE_BYTES

    async def parse() -> tuple:
        parsers = BodyParsers(1)
        await parsers.start()
        try:
            parsed = await parsers.run(infer_call, big.SerializeToString())
            with pytest.raises(BadRequest, match="bytes of raw_input_contents for shape"):
                await parsers.run(infer_call, lying.SerializeToString())
            return parsed
        finally:
            parsers.close()

    np.testing.assert_array_equal(asyncio.run(parse()).images, infer_call(big.SerializeToString()).images)


# --- a real server ---------------------------------------------------------------------------------

SERVICE = "/inference.GRPCInferenceService"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    registry = two_version_registry(tmp_path_factory.mktemp("kserve-grpc"))
    with running_server(registry.root, tmp_path_factory.mktemp("server") / "serve.log") as running:
        yield running


@pytest.fixture()
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as opened:
        yield opened


def call(channel: grpc.Channel, method: str, request, response_type):
    """One unary call by the method's path, the request a message or its bytes as they go on the wire."""
    serialize = (lambda raw: raw) if isinstance(request, bytes) else type(request).SerializeToString
    stub = channel.unary_unary(
        f"{SERVICE}/{method}", request_serializer=serialize, response_deserializer=response_type.FromString
    )
    return stub(request, timeout=30)


def infer(channel: grpc.Channel, request) -> v2.ModelInferResponse:
    return call(channel, "ModelInfer", request, v2.ModelInferResponse)


def rest_probabilities(server: RunningServer, images: np.ndarray, version: str = "") -> np.ndarray:
    path = f"/versions/{version}" if version else ""
    tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8", "data": images.ravel().tolist()}
    answer = httpx.post(f"{server.url}/v2/models/fashion-mnist{path}/infer", json={"inputs": [tensor]})
    assert answer.status_code == 200, answer.text
    [output] = answer.json()["outputs"]
    return np.array(output["data"], np.float32).reshape(output["shape"])


def probabilities_of(response: v2.ModelInferResponse) -> np.ndarray:
    [output] = response.outputs
    assert (output.name, output.datatype) == ("probabilities", "FP32")
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(output.shape))
    return np.array(output.contents.fp32_contents, np.float32).reshape(list(output.shape))


@pytest.mark.training
def test_infer_answers_as_rest_does_with_raw_or_contents(server: RunningServer, channel: grpc.Channel) -> None:
    expected = rest_probabilities(server, IMAGES)
    assert expected.shape == (3, 10)
    for version in ("", "1"):
        for datatype, pixels, raw in (
            ("UINT8", IMAGES, True),
            ("FP32", SCALED, False),
            ("FP32", SCALED.reshape(3, 784), True),
            ("UINT8", IMAGES.reshape(3, 784), False),
        ):
            request = infer_request(pixels, datatype, raw=raw, model_version=version, id="r-7")
            response = infer(channel, request)
            assert (response.model_name, response.model_version, response.id) == ("fashion-mnist", "1", "r-7")
            assert bool(response.raw_output_contents) is raw, (datatype, raw)
            assert np.abs(probabilities_of(response) - expected).max() <= 1e-6, (version, datatype, raw)
    many = np.tile(IMAGES, (100, 1, 1))  # 300 images as FP32: a 940 KB message, parsed in a worker process
    response = infer(channel, infer_request((many / np.float32(255)).astype(np.float32), "FP32"))
    assert np.abs(probabilities_of(response) - np.tile(expected, (100, 1))).max() <= 1e-6


@pytest.mark.training
def test_health_readiness_and_metadata(server: RunningServer, channel: grpc.Channel) -> None:
    assert call(channel, "ServerLive", v2.ServerLiveRequest(), v2.ServerLiveResponse).live
    assert call(channel, "ServerReady", v2.ServerReadyRequest(), v2.ServerReadyResponse).ready
    for version, ready in (("", True), ("1", True), ("2", False), ("9", False)):  # v0002 is registered, not served
        request = v2.ModelReadyRequest(name="fashion-mnist", version=version)
        assert call(channel, "ModelReady", request, v2.ModelReadyResponse).ready is ready, version
    metadata = call(channel, "ServerMetadata", v2.ServerMetadataRequest(), v2.ServerMetadataResponse)
    assert json_of(metadata) == httpx.get(f"{server.url}/v2").json()
    for version in ("", "1"):
        request = v2.ModelMetadataRequest(name="fashion-mnist", version=version)
        path = f"/versions/{version}" if version else ""
        rest = httpx.get(f"{server.url}/v2/models/fashion-mnist{path}").json()
        assert json_of(call(channel, "ModelMetadata", request, v2.ModelMetadataResponse)) == rest, version
    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "inference.GRPCInferenceService" in services and "tensorflow.serving.PredictionService" in services


NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
# (method, request, response type, code, words of the refusal)
SERVER_REFUSED = {
    "another model": ("ModelInfer", infer_request(IMAGES, "UINT8", model_name="other"), NOT_FOUND, "Latest(other)"),
    "an unknown version": (
        "ModelInfer",
        infer_request(IMAGES, "UINT8", model_version="9"),
        NOT_FOUND,
        "Specific(fashion-mnist, 9)",
    ),
    "a version that is no number": (
        "ModelInfer",
        infer_request(IMAGES, "UINT8", model_version="latest"),
        NOT_FOUND,
        "Specific(fashion-mnist, latest)",
    ),
    "a version past int64": (
        "ModelInfer",
        infer_request(IMAGES, "UINT8", model_version="9" * 30),
        INVALID,
        "Failed to convert version",
    ),
    "lying raw sizes": ("ModelInfer", REFUSED["raw bytes short of the shape"][0], INVALID, "raw_input_contents"),
    "a huge shape": ("ModelInfer", REFUSED["a huge count"][0], INVALID, f"at most {MAX_INSTANCES:,}"),
    "a bad datatype": ("ModelInfer", REFUSED["a string datatype"][0], INVALID, "datatype 'BYTES'"),
    "not a message": ("ModelInfer", b"\xff\xff\xff", INVALID, "not a ModelInferRequest message"),
    "metadata of another model": ("ModelMetadata", v2.ModelMetadataRequest(name="other"), NOT_FOUND, "other"),
    "metadata of an unknown version": (
        "ModelMetadata",
        v2.ModelMetadataRequest(name="fashion-mnist", version="9"),
        NOT_FOUND,
        "Specific(fashion-mnist, 9)",
    ),
    "readiness of another model": ("ModelReady", v2.ModelReadyRequest(name="other"), NOT_FOUND, "Latest(other)"),
    "a method this server does not have": ("ModelStreamInfer", b"", grpc.StatusCode.UNIMPLEMENTED, ""),
}


@pytest.mark.training
@pytest.mark.parametrize("case", SERVER_REFUSED, ids=list(SERVER_REFUSED))
def test_refusals_carry_tf_servings_codes(channel: grpc.Channel, case: str) -> None:
    method, request, code, words = SERVER_REFUSED[case]
    with pytest.raises(grpc.RpcError) as refused:
        call(channel, method, request, v2.ModelInferResponse)
    assert refused.value.code() == code and words in refused.value.details(), refused.value.details()


# tritonclient.grpc defines the same `inference` messages in protobuf's default pool as the committed
# module: the two cannot share a process, so Triton's client runs in its own.
TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as triton

client = triton.InferenceServerClient(sys.argv[1])
images = np.array(json.loads(sys.argv[2]), np.uint8)
said = {
    "live": client.is_server_live(),
    "ready": client.is_server_ready(),
    "model ready": client.is_model_ready("fashion-mnist"),
    "version 9 ready": client.is_model_ready("fashion-mnist", "9"),
    "server": client.get_server_metadata(as_json=True),
    "model": client.get_model_metadata("fashion-mnist", as_json=True),
}
for datatype, pixels in (("UINT8", images), ("FP32", (images / np.float32(255)).astype(np.float32))):
    tensor = triton.InferInput("images", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels)
    result = client.infer("fashion-mnist", [tensor], request_id="r-7")
    said[datatype] = [result.as_numpy("probabilities").tolist(), result.get_response(as_json=True)]
print(json.dumps(said))
"""


@pytest.mark.training
def test_tritonclients_grpc_client_with_its_defaults(server: RunningServer) -> None:
    """Triton's client sends raw_input_contents and reads only raw_output_contents for numbers."""
    command = [sys.executable, "-c", TRITON_CLIENT, server.grpc, json.dumps(IMAGES.tolist())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    said = json.loads(done.stdout)
    assert said["live"] and said["ready"] and said["model ready"] and not said["version 9 ready"]
    assert said["server"]["name"] == "fashion-mnist-serve" and said["model"]["versions"] == ["1"]
    assert said["model"]["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "28", "28"]}]
    expected = rest_probabilities(server, IMAGES)
    for datatype in ("UINT8", "FP32"):
        probabilities, response = said[datatype]
        assert response["id"] == "r-7" and response["model_version"] == "1", response
        assert np.abs(np.array(probabilities) - expected).max() <= 1e-6, datatype
