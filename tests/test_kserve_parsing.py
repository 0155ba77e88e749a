"""The Open Inference Protocol's parsing and answers as plain functions (no server, no TensorFlow): the
JSON and binary tensor forms, tritonclient's own request bodies and its reading of our answers, and
every lie the binary extension lets a client tell, refused with a message naming it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from fmnist.serving import kserve
from fmnist.serving.errors import BadRequest
from fmnist.serving.payloads import MAX_INSTANCES
from tests.helpers import synthetic_images

IMAGES = synthetic_images(np.array([0, 3, 7], dtype=np.uint8), seed=21)
SCALED = (IMAGES / np.float32(255)).astype(np.float32)


def binary_body(inputs: list[dict], tensor_bytes: bytes, **request) -> tuple[bytes, int]:
    header = json.dumps({"inputs": inputs, **request}).encode()
    return header + tensor_bytes, len(header)


def binary_input(datatype: str, size, shape: list[int] | None = None) -> dict:
    shape = shape or [len(IMAGES), 28, 28]
    return {"name": "images", "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


def json_request(datatype: str, data: list) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": [3, 784], "datatype": datatype, "data": data}]}).encode()


def test_binary_uint8_and_fp32_give_the_json_paths_images() -> None:
    expected = kserve.parse_infer(json_request("UINT8", IMAGES.ravel().tolist())).images
    raw = IMAGES.tobytes()
    parsed = kserve.parse_infer(*binary_body([binary_input("UINT8", len(raw))], raw))
    np.testing.assert_array_equal(parsed.images, expected)
    assert parsed.images.dtype == np.float32 and parsed.images.shape == (3, 28, 28)
    floats = SCALED.astype("<f4").tobytes()
    parsed = kserve.parse_infer(*binary_body([binary_input("FP32", len(floats), [3, 784])], floats))
    from_json = kserve.parse_infer(json_request("FP32", SCALED.ravel().tolist())).images
    np.testing.assert_array_equal(parsed.images, from_json)
    np.testing.assert_allclose(parsed.images, expected, atol=1e-7)


@pytest.mark.parametrize(
    ("datatype", "pixels"),
    [
        ("INT8", (IMAGES // 2).astype("<i1")),
        ("UINT16", IMAGES.astype("<u2")),
        ("INT32", IMAGES.astype("<i4")),
        ("UINT64", IMAGES.astype("<u8")),
        ("FP16", (IMAGES / 255).astype("<f2")),
        ("FP64", (IMAGES / 255).astype("<f8")),
    ],
)
def test_the_other_datatypes_are_read_as_their_json_forms_are(datatype: str, pixels: np.ndarray) -> None:
    raw = pixels.tobytes()
    parsed = kserve.parse_infer(*binary_body([binary_input(datatype, len(raw))], raw))
    from_json = kserve.parse_infer(json_request(datatype, pixels.ravel().tolist())).images
    np.testing.assert_array_equal(parsed.images, from_json)


def test_the_json_request_is_not_counted_for_nesting_in_the_binary_data() -> None:
    """Pixels of value 91 are b"[" bytes: a full batch of them is pixels, not nesting."""
    raw = np.full((MAX_INSTANCES, 784), ord("["), np.uint8).tobytes()
    parsed = kserve.parse_infer(*binary_body([binary_input("UINT8", len(raw), [MAX_INSTANCES, 784])], raw))
    assert parsed.images.shape == (MAX_INSTANCES, 28, 28)


@pytest.mark.parametrize(
    ("request_parameters", "outputs", "binary"),
    [
        (None, None, False),
        ({"binary_data_output": True}, None, True),
        ({"binary_data_output": True}, [{"name": "probabilities"}], True),
        ({"binary_data_output": True}, [{"name": "probabilities", "parameters": {"binary_data": False}}], False),
        (None, [{"name": "probabilities", "parameters": {"binary_data": True}}], True),
        ({"binary_data_output": False}, [], False),
    ],
)
def test_binary_output_is_asked_per_output_or_for_the_request(request_parameters, outputs, binary: bool) -> None:
    request = {"inputs": [{"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784}]}
    if request_parameters is not None:
        request["parameters"] = request_parameters
    if outputs is not None:
        request["outputs"] = outputs
    assert kserve.parse_infer(json.dumps(request).encode()).binary_output is binary


@pytest.mark.parametrize("binary_data", [True, False])
@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
def test_tritonclients_request_bodies_parse(datatype: str, binary_data: bool) -> None:
    images = IMAGES if datatype == "UINT8" else SCALED
    tensor = triton.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary_data)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor], request_id="r-1")
    parsed = kserve.parse_infer(body, header_length)
    np.testing.assert_allclose(parsed.images, SCALED, atol=1e-7)
    assert parsed.id == "r-1" and parsed.binary_output  # no outputs named: tritonclient asks for binary


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_reads_the_answer_in_either_form(binary: bool) -> None:
    probabilities = np.random.default_rng(3).dirichlet(np.ones(10), size=3).astype(np.float32)
    body, header_length = kserve.infer_response("fashion-mnist", 2, "r-1", probabilities, binary)
    assert (header_length is not None) is binary
    if binary:
        header = json.loads(body[:header_length])
        assert header["outputs"][0]["parameters"] == {"binary_data_size": 3 * 10 * 4}
        assert len(body) == header_length + 3 * 10 * 4
    result = triton.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "r-1"


def test_the_server_metadata_names_only_the_binary_extension() -> None:
    metadata = kserve.server_metadata()
    assert metadata["extensions"] == ["binary_tensor_data"]
    assert metadata["name"] == "fashion-mnist-serve" and metadata["version"]


RAW = IMAGES.tobytes()
JSON_REQUEST = json_request("UINT8", IMAGES.ravel().tolist())
LIES = {
    "the header length past the body": (
        lambda: (b'{"inputs": []}', 15),
        "Inference-Header-Content-Length is 15, past the body's end (14 bytes)",
    ),
    "a binary size past the end": (
        lambda: binary_body([binary_input("UINT8", len(RAW) + 1)], RAW),
        f"binary_data_size {len(RAW) + 1:,} is past the body's end: {len(RAW):,} bytes follow",
    ),
    "a huge binary size": (
        lambda: binary_body([binary_input("UINT8", 1 << 62)], RAW),
        "is past the body's end",
    ),
    "a binary size short of the shape": (
        lambda: binary_body([binary_input("UINT8", 784)], RAW[:784]),
        "binary_data_size 784 for shape [3, 28, 28] of UINT8 (2,352 bytes)",
    ),
    "a binary size that counts UINT8 for FP32": (
        lambda: binary_body([binary_input("FP32", len(RAW))], RAW),
        "binary_data_size 2,352 for shape [3, 28, 28] of FP32 (9,408 bytes)",
    ),
    "a negative binary size": (
        lambda: binary_body([binary_input("UINT8", -1)], RAW),
        "binary_data_size must be a byte count (a non-negative integer); got -1",
    ),
    "a binary size as a string": (
        lambda: binary_body([binary_input("UINT8", str(len(RAW)))], RAW),
        "binary_data_size must be a byte count",
    ),
    "bytes no input claims": (
        lambda: binary_body([binary_input("UINT8", len(RAW))], RAW + b"\0\0"),
        "2 bytes after the input's binary data",
    ),
    "binary bytes without binary_data_size": (
        lambda: (JSON_REQUEST + b"\0", len(JSON_REQUEST)),
        "no input has binary_data_size",
    ),
    "binary_data_size without the header": (
        lambda: (json.dumps({"inputs": [binary_input("UINT8", len(RAW))]}).encode(), None),
        "no Inference-Header-Content-Length",
    ),
    "data and binary data both": (
        lambda: binary_body([{**binary_input("UINT8", len(RAW)), "data": [0]}], RAW),
        "both data and binary_data_size",
    ),
    "a negative image count": (
        lambda: binary_body([binary_input("UINT8", 0, [-1, 784])], b""),
        "expected shape [n, 28, 28] or [n, 784]; got [-1, 784]",
    ),
    "more images than a request holds": (
        lambda: binary_body([binary_input("UINT8", 1 << 40, [1 << 40, 784])], RAW),
        f"at most {MAX_INSTANCES:,} in one request",
    ),
    "integer pixels over 255": (
        lambda: binary_body([binary_input("INT16", 3 * 784 * 2)], np.full(3 * 784, 256, "<i2").tobytes()),
        "INT16 pixels are raw 8-bit values",
    ),
    "NaN pixels": (
        lambda: binary_body([binary_input("FP32", 3 * 784 * 4)], np.full(3 * 784, np.nan, "<f4").tobytes()),
        "pixels must be finite numbers",
    ),
}


@pytest.mark.parametrize("case", LIES, ids=list(LIES))
def test_the_binary_extensions_lies_are_refused(case: str) -> None:
    make, message = LIES[case]
    with pytest.raises(BadRequest) as refused:
        kserve.parse_infer(*make())
    assert message in str(refused.value)


def tensor(**fields) -> dict:
    return {"name": "images", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784, **fields}


MALFORMED = {
    "an empty body": (b"", "the JSON request is empty"),
    "a JSON array": ([1, 2], "the body is a JSON array"),
    "not JSON": (b"{", "the body is not JSON"),
    "inputs an object": ({"inputs": {"images": [0]}}, '"inputs": a list of tensors'),
    "a tensor that is a number": ({"inputs": [5]}, 'expected one input tensor, named "images"'),
    "a tensor named in unicode": ({"inputs": [tensor(name="imagés☃")]}, 'named "images"'),
    "a datatype that is an object": ({"inputs": [tensor(datatype={"a": 1})]}, "datatype \"{'a': 1}\""),
    "a shape of strings": ({"inputs": [tensor(shape=["1", "784"])]}, "shape must be a list of integers"),
    "a shape of booleans": ({"inputs": [tensor(shape=[True, 784])]}, "shape must be a list of integers"),
    "a shape past 64 bits": ({"inputs": [tensor(shape=[1 << 64, 784])]}, "shape must be a list of integers"),
    "data of objects": ({"inputs": [tensor(data=[{"a": 1}] * 784)]}, "data must be numbers"),
    "data of lists and objects": ({"inputs": [tensor(data=[[1], {"a": 1}])]}, "data is ragged"),
    "data nested 500 deep": ({"inputs": [tensor(data=json.loads("[" * 500 + "1" + "]" * 500))]}, "data is ragged"),
    "data past the shape": ({"inputs": [tensor(data=[0] * 784 * 3)]}, "2,352 values for shape [1, 784] (784)"),
    "outputs an object": ({"inputs": [tensor()], "outputs": {"name": "probabilities"}}, '"outputs" must be a list'),
    "an output named by a list": ({"inputs": [tensor()], "outputs": [{"name": [1]}]}, '"outputs" must be a list'),
    "an unknown output in unicode": ({"inputs": [tensor()], "outputs": [{"name": "☃"}]}, "unknown output '☃'"),
    "two outputs": (
        {"inputs": [tensor()], "outputs": [{"name": "probabilities"}] * 2},
        "2 outputs asked for; the model has one",
    ),
    "request parameters a list": ({"inputs": [tensor()], "parameters": [1]}, "parameters must be an object"),
    "input parameters a string": ({"inputs": [tensor(parameters="x")]}, "parameters must be an object"),
    "binary_data a string": (
        {"inputs": [tensor()], "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]},
        "'binary_data' must be true or false",
    ),
    "the classification extension": (
        {"inputs": [tensor()], "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]},
        "'classification' belongs to an extension this server does not implement",
    ),
    "shared memory": (
        {"inputs": [tensor(parameters={"shared_memory_region": "r"})]},
        "'shared_memory_region' belongs to an extension",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_requests_are_refused_naming_the_problem(case: str) -> None:
    body, message = MALFORMED[case]
    with pytest.raises(BadRequest) as refused:
        kserve.parse_infer(body if isinstance(body, bytes) else json.dumps(body).encode())
    assert message in str(refused.value)


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "+3", "9" * 300, "\uff11\uff12"])
def test_a_header_length_that_is_no_byte_count_is_refused(value: str) -> None:
    with pytest.raises(BadRequest, match="must be a byte count"):
        kserve.declared_json_length([value])


def test_the_header_length_is_read_once() -> None:
    assert kserve.declared_json_length([]) is None and kserve.declared_json_length(["120"]) == 120
    with pytest.raises(BadRequest, match="more than once"):
        kserve.declared_json_length(["120", "120"])


@pytest.mark.parametrize(
    ("version", "matches"),
    [("1", True), ("007", True), ("-1", False), ("1e999", False), ("\u00b2", False), ("\u0661", False)],
)
def test_a_version_in_a_path_is_ascii_digits(version: str, matches: bool) -> None:
    """Not str.isdigit(): it takes "\u00b2" (superscript two), which int() refuses, and Arabic-Indic digits."""
    assert bool(kserve.VERSION.fullmatch(version)) is matches
