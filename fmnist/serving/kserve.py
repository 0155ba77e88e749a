"""The Open Inference Protocol (KServe v2) over REST, for clients and gateways that speak it:

    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/fashion-mnist[/versions/N]          metadata: inputs, outputs, versions
    GET  /v2/models/fashion-mnist[/versions/N]/ready
    POST /v2/models/fashion-mnist[/versions/N]/infer    {"inputs": [{"name": "images", "shape": [n, 28, 28],
                                                          "datatype": "UINT8" | "FP32", "data": [...]}]}

Pixels as in TF Serving's API: UINT8 (and the other integer types) raw 0..255, FP32/FP64 in [0, 1].
`parse_infer` is a plain function, run in the body parsers' worker processes as the JSON predict is.
"""

from __future__ import annotations

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

MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/infer|/ready)?")
HEALTH_PATH = re.compile(r"/v2/health/(live|ready)")
INTEGER_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}


@dataclass(frozen=True)
class InferRequest:
    images: np.ndarray  # float32 (n, 28, 28) in [0, 1]
    id: str | None


def parse_infer(body: bytes) -> InferRequest:
    """The images of an inference request; BadRequest naming the first problem."""
    check_nesting(body)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise BadRequest('an inference request is an object with "inputs": a list of tensors')
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest('"id" must be a string')
    if unknown := {o.get("name") if isinstance(o, dict) else o for o in payload.get("outputs") or []} - {OUTPUT}:
        raise BadRequest(f"unknown output {sorted(map(str, unknown))[0][:64]!r}; the model's output is {OUTPUT!r}")
    tensors = payload["inputs"]
    if len(tensors) != 1 or not isinstance(tensors[0], dict) or tensors[0].get("name") != INPUT:
        raise BadRequest(f'expected one input tensor, named "{INPUT}"')
    tensor = tensors[0]
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if datatype not in INTEGER_TYPES | FLOAT_TYPES:
        raise BadRequest(f"{INPUT}: datatype {str(datatype)[:16]!r}; send UINT8 raw pixels or FP32 in [0, 1]")
    if not (isinstance(shape, list) and all(type(d) is int for d in shape)):
        raise BadRequest(f"{INPUT}: shape must be a list of integers")
    if shape[1:] not in ([IMAGE_SIZE, IMAGE_SIZE], [PIXELS]) or not shape or shape[0] < 1:
        raise BadRequest(f"{INPUT}: expected shape [n, 28, 28] or [n, 784]; got {shape[:4]}")
    if shape[0] > MAX_INSTANCES:
        raise BadRequest(f"{shape[0]:,} images; at most {MAX_INSTANCES:,} in one request")
    if not isinstance(data, list):
        raise BadRequest(f"{INPUT}: data must be a list of numbers")
    try:
        values = np.array(data).reshape(-1)
    except ValueError:
        raise BadRequest(f"{INPUT}: data is ragged") from None
    if values.dtype.kind not in "iuf" or (may_hold_booleans(body) and holds_boolean(data)):
        raise BadRequest(f"{INPUT}: data must be numbers")
    if len(values) != shape[0] * PIXELS:
        raise BadRequest(f"{INPUT}: {len(values):,} values for shape {shape} ({shape[0] * PIXELS:,})")
    if datatype in INTEGER_TYPES:
        if values.dtype.kind == "f" or values.min() < 0 or values.max() > 255:
            raise BadRequest(f"{INPUT}: {datatype} pixels are raw 8-bit values, integers 0..255")
        values = values.astype(np.uint8)
    images = scaled_pixels(values.reshape(shape[0], IMAGE_SIZE, IMAGE_SIZE), INPUT)
    return InferRequest(images, request_id)


def metadata(name: str, versions: list[int]) -> dict:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "tensorflow_savedmodel",
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(CLASS_NAMES)]}],
    }


def infer_response(name: str, version: int, request_id: str | None, probabilities: np.ndarray) -> bytes:
    answer = {
        "model_name": name,
        "model_version": str(version),
        "outputs": [
            {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape), "data": probabilities.ravel()}
        ],
    }
    if request_id is not None:
        answer["id"] = request_id
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
