"""The Open Inference Protocol's (KServe v2) gRPC messages, without TensorFlow: the requests read into
plain values by functions the body parsers' worker processes run on a message's raw bytes (as they run
`kserve.parse_infer` on a REST body), and the answers built. The messages are KServe's
(`protos/grpc_predict_v2.proto`); the pixels are read as the REST path reads them (kserve.py's
datatypes, shapes and scaling), every size a request claims checked before the work it would cost.

A ModelInfer request's `images` come either in the input's `contents`, in the field of its datatype
(`uint_contents` for UINT8, `fp32_contents` for FP32, ...), or as raw little-endian bytes in the
request's `raw_input_contents` (what Triton's client sends). The probabilities go back the same way:
raw in `raw_output_contents` for a raw request, else in `contents.fp32_contents`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format

from fmnist.serving import kserve
from fmnist.serving.errors import BadRequest
from fmnist.serving.grpc_messages import parse_message
from fmnist.serving.payloads import PIXELS
from fmnist.serving.protos import grpc_predict_v2_pb2 as v2
from fmnist.training.export import INPUT, OUTPUT

# The InferTensorContents field that holds each datatype's values, and its values' type. FP16 has none:
# it is sent in raw_input_contents only.
CONTENTS = {
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
}
CONTENTS_FIELDS = tuple(v2.InferTensorContents.DESCRIPTOR.fields_by_name)
MAX_NAME = 200  # characters of a model name or version kept (any longer is refused as unknown)


@dataclass(frozen=True)
class ModelCall:
    """What a ModelReady or ModelMetadata request names ("" for the version: the server chooses)."""

    name: str
    version: str


@dataclass(frozen=True)
class InferCall:
    name: str
    version: str  # "" for the champion
    id: str
    images: np.ndarray  # float32 (n, 28, 28) in [0, 1]
    raw: bool  # the pixels came in raw_input_contents: the probabilities go back in raw_output_contents


def empty_call(full_name: str, raw: bytes) -> None:
    """A request with no fields (ServerLive, ServerReady, ServerMetadata): only checked to be a message."""
    parse_message(full_name, raw)


def model_ready_call(raw: bytes) -> ModelCall:
    request = parse_message(v2.ModelReadyRequest.DESCRIPTOR.full_name, raw)
    return ModelCall(request.name[:MAX_NAME], request.version[:MAX_NAME])


def model_metadata_call(raw: bytes) -> ModelCall:
    request = parse_message(v2.ModelMetadataRequest.DESCRIPTOR.full_name, raw)
    return ModelCall(request.name[:MAX_NAME], request.version[:MAX_NAME])


def infer_call(raw: bytes) -> InferCall:
    """A ModelInferRequest's images, as float32 (n, 28, 28) in [0, 1]; BadRequest naming the first problem."""
    request = parse_message(v2.ModelInferRequest.DESCRIPTOR.full_name, raw)
    refuse_unimplemented(request.parameters, "the request")
    check_outputs(request.outputs)
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
        raise BadRequest(f'expected one input tensor, named "{INPUT}"')
    tensor = request.inputs[0]
    refuse_unimplemented(tensor.parameters, INPUT)
    if len(tensor.shape) not in (2, 3):  # before the shape is copied
        raise BadRequest(f"{INPUT}: expected shape [n, 28, 28] or [n, 784]; got {len(tensor.shape):,} dimensions")
    datatype, shape = kserve.tensor_head({"datatype": tensor.datatype, "shape": list(tensor.shape)})
    if request.raw_input_contents:
        values = raw_values(request, datatype, shape)
    else:
        values = content_values(tensor, datatype, shape)
    images = kserve.as_images(values, datatype, shape[0])
    name, version = request.model_name[:MAX_NAME], request.model_version[:MAX_NAME]
    return InferCall(name, version, request.id, images, raw=bool(request.raw_input_contents))


def refuse_unimplemented(parameters, what: str) -> None:
    """Parameters of extensions this server does not implement (shared memory, classification): answering
    as if they were absent would put the answer where the client does not look for it."""
    if unknown := [name for name in kserve.UNIMPLEMENTED if name in parameters]:
        raise BadRequest(
            f"{what}: {unknown[0]!r} belongs to an extension this server does not implement "
            f"(it implements {', '.join(kserve.EXTENSIONS)})"
        )


def check_outputs(outputs) -> None:
    """At most the model's one output may be asked for (none asked: all of them)."""
    if len(outputs) > 1:
        raise BadRequest(f"{len(outputs):,} outputs asked for; the model has one, {OUTPUT!r}")
    for output in outputs:
        if output.name != OUTPUT:
            raise BadRequest(f"unknown output {output.name[:64]!r}; the model's output is {OUTPUT!r}")
        refuse_unimplemented(output.parameters, OUTPUT)


def raw_values(request, datatype: str, shape: list[int]) -> np.ndarray:
    """The input's raw bytes: one entry for the one input, exactly what its shape and datatype need."""
    if len(request.raw_input_contents) != 1:
        raise BadRequest(f"{len(request.raw_input_contents):,} raw_input_contents for one input; send one")
    if request.inputs[0].HasField("contents"):
        raise BadRequest(f"{INPUT}: both contents and raw_input_contents; send the pixels one way")
    layout = np.dtype(kserve.BINARY_LAYOUT[datatype])
    expected = shape[0] * PIXELS * layout.itemsize
    tensor_bytes = request.raw_input_contents[0]
    if len(tensor_bytes) != expected:
        raise BadRequest(
            f"{INPUT}: {len(tensor_bytes):,} bytes of raw_input_contents for shape {shape} of {datatype} "
            f"({expected:,} bytes)"
        )
    return np.frombuffer(tensor_bytes, layout)


def content_values(tensor, datatype: str, shape: list[int]) -> np.ndarray:
    """The input's values from the contents field of its datatype, as many as its shape says; none elsewhere."""
    if datatype not in CONTENTS:
        raise BadRequest(f"{INPUT}: {datatype} has no contents field; send its bytes in raw_input_contents")
    field, dtype = CONTENTS[datatype]
    if other := [name for name in CONTENTS_FIELDS if name != field and len(getattr(tensor.contents, name))]:
        raise BadRequest(f"{INPUT}: {datatype} values go in contents.{field}; got {other[0]}")
    values = getattr(tensor.contents, field)
    expected = shape[0] * PIXELS
    if len(values) != expected:
        raise BadRequest(f"{INPUT}: {len(values):,} values in contents.{field} for shape {shape} ({expected:,})")
    return np.array(values, dtype)


def infer_response(
    name: str, version: int, request_id: str, probabilities: np.ndarray, raw: bool
) -> v2.ModelInferResponse:
    response = v2.ModelInferResponse(model_name=name, model_version=str(version), id=request_id)
    output = response.outputs.add(name=OUTPUT, datatype="FP32", shape=probabilities.shape)
    if raw:
        response.raw_output_contents.append(probabilities.astype("<f4").tobytes())
    else:
        output.contents.fp32_contents.extend(probabilities.ravel().tolist())
    return response


def server_metadata() -> v2.ServerMetadataResponse:
    """What REST's GET /v2 says, as its message."""
    return json_format.ParseDict(kserve.server_metadata(), v2.ServerMetadataResponse())


def model_metadata(name: str, versions: list[int]) -> v2.ModelMetadataResponse:
    """What REST's GET /v2/models/NAME[/versions/N] says, as its message."""
    return json_format.ParseDict(kserve.metadata(name, versions), v2.ModelMetadataResponse())
