"""TF Serving's gRPC API (tensorflow-serving-api): PredictionService's Predict and GetModelMetadata,
and ModelService's GetModelStatus, on their own port (8500, TF Serving's), in the REST server's event
loop, sharing its models and batcher. Classify, Regress, MultiInference and HandleReloadConfigRequest
answer UNIMPLEMENTED, as the generated base classes do.

Predict takes the signature's input `images`: uint8 raw pixels (the export's dtype) or float32 already
in [0, 1], shaped (n, 28, 28) or (n, 784); it answers `probabilities`, float32 (n, 10).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from tensorflow_serving.apis import model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.serving import tfserving
from fmnist.serving.errors import BadRequest, ServingError
from fmnist.serving.payloads import MAX_INSTANCES, PIXELS, scaled_pixels
from fmnist.serving.service import PredictionCore
from fmnist.training.export import INPUT, OUTPUT, SIGNATURE

MAX_MESSAGE_BYTES = 8 << 20  # 1,024 float32 images are 3.2 MB
DTYPES = {4: np.uint8, 1: np.float32}  # DT_UINT8, DT_FLOAT


def spec_choice(spec) -> tuple[int | None, str | None]:
    """The version or label a request's ModelSpec names, checked as TF Serving checks it."""
    version = str(spec.version.value) if spec.HasField("version") else None
    label = spec.version_label if spec.HasField("version_label") else None
    return tfserving.requested(spec.name, version, label)


def check_signature(name: str) -> None:
    if name not in ("", SIGNATURE):
        raise BadRequest(f'Serving signature name: "{name[:100]}" not found in signature def')


def images_of(request: predict_pb2.PredictRequest) -> np.ndarray:
    """The request's `images` tensor as float32 (n, 28, 28) in [0, 1], every claim of it checked
    before a byte is allocated (a TensorProto may claim a shape its values do not fill)."""
    names = set(request.inputs)
    if names != {INPUT}:
        unknown = ", ".join(sorted(names - {INPUT})[:4]) or f"none (missing {INPUT})"
        raise BadRequest(
            f"input tensor alias not found in signature: {unknown}. Inputs expected to be in the set {{{INPUT}}}."
        )
    if unknown := set(request.output_filter) - {OUTPUT}:
        raise BadRequest(f"output tensor alias not found in signature: {', '.join(sorted(unknown)[:4])}")
    tensor = request.inputs[INPUT]
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise BadRequest(f"{INPUT}: expects uint8 (raw pixels) or float (in [0, 1]); got dtype enum {tensor.dtype}")
    dims = [d.size for d in tensor.tensor_shape.dim]
    if len(dims) not in (2, 3) or dims[1:] not in ([IMAGE_SIZE, IMAGE_SIZE], [PIXELS]) or dims[0] < 1:
        raise BadRequest(f"{INPUT}: expected shape [n, 28, 28] or [n, 784]; got {dims[:4]}")
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


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: PredictionCore) -> None:
        self.core = core

    async def Predict(self, request, context):
        import tensorflow as tf

        async def answer():
            check_signature(request.model_spec.signature_name)
            version, label = spec_choice(request.model_spec)
            result = await self.core.predict(images_of(request), version, label)
            response = predict_pb2.PredictResponse(model_spec=tfserving.model_spec(result.served))
            response.outputs[OUTPUT].CopyFrom(tf.make_tensor_proto(result.probabilities))
            return response

        return await grpc_call(self.core, answer, context, "predict")

    async def GetModelMetadata(self, request, context):
        async def answer():
            if unknown := set(request.metadata_field) - {"signature_def"}:
                raise BadRequest(f"Metadata field {sorted(unknown)[0][:64]} is not supported")
            if not request.metadata_field:
                raise BadRequest("GetModelMetadataRequest must specify at least one metadata_field")
            version, label = spec_choice(request.model_spec)
            return tfserving.metadata_response(self.core.models.resolve(version, label))

        return await grpc_call(self.core, answer, context, "GetModelMetadata")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: PredictionCore) -> None:
        self.core = core

    async def GetModelStatus(self, request, context):
        async def answer():
            version, label = spec_choice(request.model_spec)
            models = self.core.models
            if version is None and label is None:
                served = models.served()
                return tfserving.status_response(served, models.problems.get("stable"))
            return tfserving.status_response([models.resolve(version, label)])

        return await grpc_call(self.core, answer, context, "GetModelStatus")


async def grpc_call(core: PredictionCore, answer, context, api: str):
    started = time.perf_counter()
    try:
        response = await answer()
    except ServingError as exc:
        core.metrics.refusals.labels(exc.reason).inc()
        core.metrics.answered(exc.code, api, "GRPC", time.perf_counter() - started)
        await context.abort(grpc.StatusCode[exc.code], str(exc))
    core.metrics.answered("OK", api, "GRPC", time.perf_counter() - started)
    return response


def grpc_server(core: PredictionCore, host: str, port: int, max_rpcs: int) -> grpc.aio.Server:
    """The gRPC server, bound (start it in the event loop that serves REST)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),  # a port taken by another process is an error, not shared
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_rpcs)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    return server
