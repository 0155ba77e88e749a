"""gRPC request messages into images, without TensorFlow: plain functions the body parsers' worker
processes run on a message's raw bytes, as they run the JSON parsers on a REST body.

The message classes are TF Serving's, from its definitions without TensorFlow
(`fmnist.serving.protos.tensorflow_serving`): neither the server nor a worker imports TensorFlow to parse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.serving.errors import BadRequest
from fmnist.serving.payloads import MAX_INSTANCES, PIXELS, scaled_pixels
from fmnist.serving.protos.tensorflow_serving import message_class
from fmnist.training.export import INPUT, OUTPUT

MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default; 1,024 float32 images are 3.2 MB
PREDICT_REQUEST = "tensorflow.serving.PredictRequest"
METADATA_REQUEST = "tensorflow.serving.GetModelMetadataRequest"
STATUS_REQUEST = "tensorflow.serving.GetModelStatusRequest"
DTYPES = {4: np.uint8, 1: np.float32}  # DT_UINT8, DT_FLOAT


def parse_message(full_name: str, raw: bytes):
    kind = message_class(full_name)  # (outside the try: a fault of the server's own is no bad request)
    try:
        return kind.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError, or a nesting too deep
        raise BadRequest(f"not a {full_name.rsplit('.', 1)[-1]} message ({type(exc).__name__})") from None


@dataclass(frozen=True)
class Spec:
    """What a request's ModelSpec asks for, as sent (checked by the server against what it serves)."""

    name: str
    version: str | None
    label: str | None
    signature: str

    @classmethod
    def of(cls, spec) -> Spec:
        version = str(spec.version.value) if spec.HasField("version") else None
        label = spec.version_label[:200] if spec.HasField("version_label") else None
        return cls(spec.name[:200], version, label, spec.signature_name[:200])


@dataclass(frozen=True)
class PredictCall:
    spec: Spec
    images: np.ndarray  # float32 (n, 28, 28) in [0, 1]


def predict_call(raw: bytes) -> PredictCall:
    request = parse_message(PREDICT_REQUEST, raw)
    return PredictCall(Spec.of(request.model_spec), images_of(request))


def metadata_call(raw: bytes) -> tuple[Spec, list[str]]:
    request = parse_message(METADATA_REQUEST, raw)
    return Spec.of(request.model_spec), [field[:64] for field in request.metadata_field[:8]]


def status_call(raw: bytes) -> Spec:
    return Spec.of(parse_message(STATUS_REQUEST, raw).model_spec)


def images_of(request) -> np.ndarray:
    """A PredictRequest's `images` tensor as float32 (n, 28, 28) in [0, 1], every claim of it checked
    before a byte is allocated (a TensorProto may claim a shape its values do not fill)."""
    names = set(request.inputs)
    if names != {INPUT}:
        unknown = ", ".join(sorted(names - {INPUT})[:4]) or f"none (missing {INPUT})"
        raise BadRequest(
            f"input tensor alias not found in signature: {unknown[:200]}. Inputs expected to be in the set {{{INPUT}}}."
        )
    if unknown := set(request.output_filter) - {OUTPUT}:
        raise BadRequest(f"output tensor alias not found in signature: {', '.join(sorted(unknown)[:4])[:200]}")
    tensor = request.inputs[INPUT]
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise BadRequest(f"{INPUT}: expects uint8 (raw pixels) or float (in [0, 1]); got dtype enum {tensor.dtype}")
    dims = tensor.tensor_shape.dim
    if len(dims) not in (2, 3):
        raise BadRequest(f"{INPUT}: expected shape [n, 28, 28] or [n, 784]; got {len(dims):,} dimensions")
    dims = [d.size for d in dims]
    if dims[1:] not in ([IMAGE_SIZE, IMAGE_SIZE], [PIXELS]) or dims[0] < 1:
        raise BadRequest(f"{INPUT}: expected shape [n, 28, 28] or [n, 784]; got {dims}")
    if dims[0] > MAX_INSTANCES:
        raise BadRequest(f"{dims[0]:,} images; at most {MAX_INSTANCES:,} in one request")
    count = dims[0] * PIXELS
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count * np.dtype(dtype).itemsize:
            raise BadRequest(f"{INPUT}: {len(tensor.tensor_content):,} bytes of content for shape {dims}")
        pixels = np.frombuffer(tensor.tensor_content, dtype)
    else:
        values = tensor.int_val if dtype is np.uint8 else tensor.float_val
        if len(values) != count:
            raise BadRequest(f"{INPUT}: {len(values):,} values for shape {dims} ({count:,})")
        pixels = np.array(values, np.int64 if dtype is np.uint8 else np.float32)
        if dtype is np.uint8:
            if pixels.min() < 0 or pixels.max() > 255:
                raise BadRequest(f"{INPUT}: uint8 values must be 0..255")
            pixels = pixels.astype(np.uint8)
    return scaled_pixels(pixels.reshape(dims[0], IMAGE_SIZE, IMAGE_SIZE), INPUT)
