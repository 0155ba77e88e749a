"""The Open Inference Protocol (KServe v2) over REST, for clients and gateways that speak it:

    GET  /v2                                            server metadata: name, version, extensions
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/fashion-mnist[/versions/N]          metadata: inputs, outputs, versions
    GET  /v2/models/fashion-mnist[/versions/N]/ready
    POST /v2/models/fashion-mnist[/versions/N]/infer    {"inputs": [{"name": "images", "shape": [n, 28, 28],
                                                          "datatype": "UINT8" | "FP32", "data": [...]}]}

Pixels as in TF Serving's API: UINT8 (and the other integer types) raw 0..255, FP32/FP64 in [0, 1].

The binary tensor data extension (Triton's, which tritonclient uses by default): the request's header
`Inference-Header-Content-Length: N` says its first N bytes are the JSON request; an input with
`"parameters": {"binary_data_size": B}` takes its B bytes (little-endian, row-major) from what follows.
An output asked for with `"parameters": {"binary_data": true}` (or every output, with the request's
`"binary_data_output": true`) is answered the same way: the JSON, then the float32 bytes.

`parse_infer` is a plain function, run in the body parsers' worker processes as the JSON predict is.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from dataclasses import dataclass

import numpy as np
import orjson

from fmnist.data.dataset import CLASS_NAMES, IMAGE_SIZE
from fmnist.serving.errors import BadRequest
from fmnist.serving.payloads import (
    MAX_INSTANCES,
    PIXELS,
    check_nesting,
    holds_boolean,
    may_hold_booleans,
    scaled_pixels,
)
from fmnist.training.export import INPUT, OUTPUT

SERVER_PATHS = ("/v2", "/v2/")
# ASCII digits only: str.isdigit() and `\d` also take digits int() refuses ("²") or reads (Arabic-Indic).
MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?")
VERSION = re.compile(r"[0-9]+")
HEALTH_PATH = re.compile(r"/v2/health/(live|ready)")
JSON_LENGTH_HEADER = "inference-header-content-length"
SERVER_NAME = "fashion-mnist-serve"
EXTENSIONS = ["binary_tensor_data"]  # only what is implemented: clients pick their path by this list
# The datatypes taken as pixels, as they are laid out in a binary tensor (little-endian).
BINARY_LAYOUT = {
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
INTEGER_TYPES = {name for name, layout in BINARY_LAYOUT.items() if layout[1] in "ui"}
FLOAT_TYPES = set(BINARY_LAYOUT) - INTEGER_TYPES
# Parameters of the extensions this server does not implement: answering as if they were absent would
# put the answer where the client does not look for it (shared memory) or give it another form.
UNIMPLEMENTED = ("classification", "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
MAX_HEADER_DIGITS = 18  # any body length fits; int() of a longer string is work a client chooses


@dataclass(frozen=True)
class InferRequest:
    images: np.ndarray  # float32 (n, 28, 28) in [0, 1]
    id: str | None
    binary_output: bool  # the probabilities as raw float32 after the JSON answer


@functools.cache
def server_version() -> str:
    return importlib.metadata.version("fashion-mnist-pipeline")


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def declared_json_length(values: list[str]) -> int | None:
    """The JSON request's length in bytes, as `Inference-Header-Content-Length` says it (None without)."""
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("Inference-Header-Content-Length is given more than once")
    value = values[0]
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_HEADER_DIGITS:
        raise BadRequest(
            f"Inference-Header-Content-Length must be a byte count (a non-negative integer); got {value[:32]!r}"
        )
    return int(value)


def parse_infer(body: bytes, json_length: int | None = None) -> InferRequest:
    """The images of an inference request whose first `json_length` bytes (all, if None) are its
    JSON; BadRequest naming the first problem. Every size the request claims is checked before the
    work it would cost."""
    header, tensor_bytes = split_body(body, json_length)
    payload = request_object(header)
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest('"id" must be a string')
    binary_output = binary_output_asked(payload)
    tensor = the_input(payload.get("inputs"))
    datatype, shape = tensor_head(tensor)
    size = parameters_of(tensor, INPUT).get("binary_data_size")
    if size is not None and json_length is None:
        raise BadRequest(f"{INPUT}: binary_data_size, but no Inference-Header-Content-Length to find the data by")
    if size is None:
        if tensor_bytes:
            raise BadRequest(f"{len(tensor_bytes):,} bytes follow the JSON request, but no input has binary_data_size")
        values = json_values(tensor, datatype, shape, strict=may_hold_booleans(header))
    else:
        values = binary_values(tensor, datatype, shape, size, tensor_bytes)
    return InferRequest(as_images(values, datatype, shape[0]), request_id, binary_output)


def split_body(body: bytes, json_length: int | None) -> tuple[bytes, memoryview]:
    """The JSON request and the binary tensors' bytes after it (a view: they are not copied)."""
    if json_length is None:
        return body, memoryview(b"")
    if json_length > len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length is {json_length:,}, past the body's end ({len(body):,} bytes)"
        )
    return body[:json_length], memoryview(body)[json_length:]


def request_object(header: bytes) -> dict:
    if not header.strip():
        raise BadRequest('the JSON request is empty; an inference request is a JSON object with "inputs"')
    check_nesting(header)  # the JSON alone: binary pixels may hold any number of b"[" bytes
    try:
        payload = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise BadRequest(f'the body is a JSON {json_kind(payload)}; an inference request is an object with "inputs"')
    return payload


def binary_output_asked(payload: dict) -> bool:
    """Whether the probabilities go back as binary: the output's `binary_data`, else the request's
    `binary_data_output`, else not. The model has one output; asking for another is refused."""
    everything = flag(parameters_of(payload, "the request"), "binary_data_output", False)
    outputs = payload.get("outputs", [])
    if not isinstance(outputs, list):
        raise BadRequest('"outputs" must be a list of objects, each with a "name"')
    if len(outputs) > 1:
        raise BadRequest(f"{len(outputs):,} outputs asked for; the model has one, {OUTPUT!r}")
    for output in outputs:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest('"outputs" must be a list of objects, each with a "name"')
        if output["name"] != OUTPUT:
            raise BadRequest(f"unknown output {output['name'][:64]!r}; the model's output is {OUTPUT!r}")
        return flag(parameters_of(output, OUTPUT), "binary_data", everything)
    return everything


def parameters_of(holder: dict, what: str) -> dict:
    parameters = holder.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{what}: parameters must be an object")
    if unknown := [name for name in UNIMPLEMENTED if name in parameters]:
        raise BadRequest(
            f"{what}: {unknown[0]!r} belongs to an extension this server does not implement "
            f"(it implements {', '.join(EXTENSIONS)})"
        )
    return parameters


def flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if type(value) is not bool:
        raise BadRequest(f"the parameter {name!r} must be true or false")
    return value


def the_input(tensors) -> dict:
    if not isinstance(tensors, list):
        raise BadRequest('an inference request is an object with "inputs": a list of tensors')
    if len(tensors) != 1 or not isinstance(tensors[0], dict) or tensors[0].get("name") != INPUT:
        raise BadRequest(f'expected one input tensor, named "{INPUT}"')
    return tensors[0]


def tensor_head(tensor: dict) -> tuple[str, list[int]]:
    """The input's datatype and shape, checked: n images of 28x28 or 784, 1 <= n <= MAX_INSTANCES."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(datatype, str) or datatype not in BINARY_LAYOUT:
        raise BadRequest(f"{INPUT}: datatype {str(datatype)[:16]!r}; send UINT8 raw pixels or FP32 in [0, 1]")
    if not (isinstance(shape, list) and all(type(d) is int for d in shape)):
        raise BadRequest(f"{INPUT}: shape must be a list of integers")
    if shape[1:] not in ([IMAGE_SIZE, IMAGE_SIZE], [PIXELS]) or not shape or shape[0] < 1:
        raise BadRequest(f"{INPUT}: expected shape [n, 28, 28] or [n, 784]; got {shape[:4]}")
    if shape[0] > MAX_INSTANCES:
        raise BadRequest(f"{shape[0]:,} images; at most {MAX_INSTANCES:,} in one request")
    return datatype, shape


def json_values(tensor: dict, datatype: str, shape: list[int], strict: bool) -> np.ndarray:
    """The input's `data` (flat or nested) as one flat array of numbers, as many as its shape says."""
    data = tensor.get("data")
    if not isinstance(data, list):
        raise BadRequest(f"{INPUT}: data must be a list of numbers (or binary_data_size, with binary data)")
    expected = shape[0] * PIXELS
    if len(data) > expected:  # before numpy copies them all
        raise BadRequest(f"{INPUT}: {len(data):,} values for shape {shape} ({expected:,})")
    try:
        values = np.array(data).reshape(-1)
    except (ValueError, TypeError):
        raise BadRequest(f"{INPUT}: data is ragged") from None
    if values.dtype.kind not in "iuf" or (strict and holds_boolean(data)):
        raise BadRequest(f"{INPUT}: data must be numbers")
    if len(values) != expected:
        raise BadRequest(f"{INPUT}: {len(values):,} values for shape {shape} ({expected:,})")
    return values


def binary_values(tensor: dict, datatype: str, shape: list[int], size, tensor_bytes: memoryview) -> np.ndarray:
    """The input's binary data: exactly `size` bytes, the rest of the body, and what its shape needs."""
    if "data" in tensor:
        raise BadRequest(f"{INPUT}: both data and binary_data_size; send the pixels one way")
    if type(size) is not int or size < 0:
        raise BadRequest(f"{INPUT}: binary_data_size must be a byte count (a non-negative integer); got {size!r:.32}")
    if size > len(tensor_bytes):
        raise BadRequest(
            f"{INPUT}: binary_data_size {size:,} is past the body's end: "
            f"{len(tensor_bytes):,} bytes follow the JSON request"
        )
    layout = np.dtype(BINARY_LAYOUT[datatype])
    expected = shape[0] * PIXELS * layout.itemsize
    if size != expected:
        raise BadRequest(f"{INPUT}: binary_data_size {size:,} for shape {shape} of {datatype} ({expected:,} bytes)")
    if size < len(tensor_bytes):
        raise BadRequest(f"{len(tensor_bytes) - size:,} bytes after the input's binary data, which no input claims")
    return np.frombuffer(tensor_bytes, layout)


def as_images(values: np.ndarray, datatype: str, count: int) -> np.ndarray:
    """Flat pixel values as float32 (n, 28, 28) in [0, 1]: integer types raw 0..255, floats scaled."""
    if datatype in INTEGER_TYPES:
        if values.dtype.kind == "f" or values.min() < 0 or values.max() > 255:
            raise BadRequest(f"{INPUT}: {datatype} pixels are raw 8-bit values, integers 0..255")
        values = values.astype(np.uint8)
    return scaled_pixels(values.reshape(count, IMAGE_SIZE, IMAGE_SIZE), INPUT)


def json_kind(value) -> str:
    names = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def metadata(name: str, versions: list[int]) -> dict:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(CLASS_NAMES)]}],
    }


def infer_response(
    name: str, version: int, request_id: str | None, probabilities: np.ndarray, binary: bool
) -> tuple[bytes, int | None]:
    """The answer's body, and the length of its JSON when the probabilities follow it as binary
    (for `Inference-Header-Content-Length`; None when the answer is all JSON)."""
    output = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
    if binary:
        tensor_bytes = probabilities.astype("<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(tensor_bytes)}
    else:
        output["data"] = probabilities.ravel()
    answer = {"model_name": name, "model_version": str(version), "outputs": [output]}
    if request_id is not None:
        answer["id"] = request_id
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    return (header + tensor_bytes, len(header)) if binary else (header, None)
