"""KServe's Open Inference Protocol (v2) over REST, in this process on stub models (no TensorFlow):
metadata, health and readiness, inference with either version in JSON, the refusals of bad requests and of
the binary tensor extension's lies, and the paths' JSON answers. tritonclient over a real socket:
test_serving_api."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from fmnist.registry.versions import Registry
from tests.helpers import synthetic_images
from tests.serving_helpers import stub_probabilities

IMAGES = synthetic_images(np.array([0, 3, 7], dtype=np.uint8), seed=21)


def test_the_open_inference_protocol_infers_with_either_version(
    app: TestClient, stub_registry: Registry, canary: str
) -> None:
    v2 = "/v2"
    assert app.get(f"{v2}/health/live").json() == {"live": True}
    assert app.get(f"{v2}/health/ready").json() == {"ready": True}
    metadata = app.get(f"{v2}/models/fashion-mnist").json()
    assert metadata["versions"] == ["1", "2"] and metadata["inputs"][0]["name"] == "images"
    assert app.get(f"{v2}/models/fashion-mnist/versions/2/ready").json() == {"name": "fashion-mnist", "ready": True}
    for path, version in (("", "v0001"), ("/versions/2", "v0002")):
        expected = stub_probabilities(stub_registry, version, IMAGES)
        for datatype, data in (("UINT8", IMAGES.reshape(-1).tolist()), ("FP32", (IMAGES / 255).tolist())):
            body = {
                "id": "r-7",
                "inputs": [{"name": "images", "shape": [3, 28, 28], "datatype": datatype, "data": data}],
            }
            answer = app.post(f"{v2}/models/fashion-mnist{path}/infer", json=body)
            assert answer.status_code == 200, answer.text
            output = answer.json()
            assert output["model_version"] == version[1:].lstrip("0") and output["id"] == "r-7"
            [tensor] = output["outputs"]
            assert tensor["name"] == "probabilities" and tensor["shape"] == [3, 10] and tensor["datatype"] == "FP32"
            assert np.abs(np.array(tensor["data"]).reshape(3, 10) - expected).max() <= 1e-5


def test_binary_tensors_in_and_out_answer_as_the_json_path_does(app: TestClient) -> None:
    tensor = {"name": "images", "shape": [3, 28, 28], "datatype": "UINT8"}
    as_json = app.post("/v2/models/fashion-mnist/infer", json={"inputs": [{**tensor, "data": IMAGES.ravel().tolist()}]})
    [output] = as_json.json()["outputs"]
    expected = np.array(output["data"], np.float32).reshape(3, 10)
    binary = {**tensor, "parameters": {"binary_data_size": IMAGES.nbytes}}
    header = json.dumps({"inputs": [binary], "parameters": {"binary_data_output": True}}).encode()
    answer = app.post(
        "/v2/models/fashion-mnist/infer",
        content=header + IMAGES.tobytes(),
        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream", answer.text
    json_length = int(answer.headers["inference-header-content-length"])
    [output] = json.loads(answer.content[:json_length])["outputs"]
    assert output["parameters"] == {"binary_data_size": expected.nbytes} and "data" not in output
    np.testing.assert_array_equal(np.frombuffer(answer.content[json_length:], "<f4").reshape(3, 10), expected)


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
def test_the_open_inference_protocol_refuses_bad_requests(app: TestClient, case: str) -> None:
    body, status, message = V2_REFUSED[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-encoding": "gzip"} if content.startswith(b"\x1f\x8b") else {}
    answer = app.post("/v2/models/fashion-mnist/infer", content=content, headers=headers)
    assert answer.status_code == status and message in answer.json()["error"], answer.text[:300]
    assert app.post("/v2/models/other/infer", content=content).status_code == 404
    assert app.get("/v2/models/fashion-mnist/versions/9").status_code == 404


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
def test_the_binary_extensions_lies_are_refused(app: TestClient, case: str) -> None:
    (body, header_length), message = BINARY_LIES[case]
    answer = app.post(
        "/v2/models/fashion-mnist/infer",
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
def test_open_inference_paths_answer_json(app: TestClient, case: str) -> None:
    path, status, message = V2_PATHS[case]
    answer = app.get(path)
    assert answer.status_code == status and answer.headers["content-type"] == "application/json", answer.text[:300]
    assert message is None or message in answer.json()["error"], answer.text[:300]
