"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService` as KServe, Triton
and MLServer define it, on the gRPC port beside TF Serving's services, answering as the REST paths of
kserve.py do:

    ServerLive                       true while the server answers
    ServerReady                      as /v2/health/ready: a verified champion, the body parsers alive
    ModelReady                       fashion-mnist, version "" (any served) or N
    ServerMetadata, ModelMetadata    as GET /v2 and /v2/models/fashion-mnist[/versions/N]
    ModelInfer                       input `images` (UINT8 raw 0..255, FP32 in [0, 1], ...), [n, 28, 28]
                                     or [n, 784]; output `probabilities`, FP32 [n, 10]

The other methods of the service (ModelStreamInfer, the repository's) answer UNIMPLEMENTED. Each method
takes its message through `GrpcDoor` (byte budget, deadline, big messages parsed in the worker
processes by kserve_grpc_messages), and its refusals are TF Serving's canonical codes.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import grpc

from fmnist.serving import kserve, tfserving
from fmnist.serving import kserve_grpc_messages as messages
from fmnist.serving.errors import NotFound
from fmnist.serving.models import MODEL_NAME
from fmnist.serving.protos import grpc_predict_v2_pb2 as v2

if TYPE_CHECKING:
    from fmnist.serving.grpc_api import GrpcDoor

INFERENCE_SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def requested(name: str, version: str) -> int | None:
    """The version number a request names (None for "", the server's choice), checked as the REST paths
    /v2/models/NAME/versions/VERSION are: an unknown name or a version that is no number is not found."""
    if version and not kserve.VERSION.fullmatch(version):
        raise NotFound(f"Servable not found for request: Specific({name[:64]}, {version[:32]})")
    return tfserving.requested(name, version or None, None)[0]


def kserve_handlers(door: GrpcDoor) -> list[grpc.GenericRpcHandler]:
    models = door.core.models

    async def live(_) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ready(_) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=door.ready())

    async def model_ready(call: messages.ModelCall) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(ready=models.serves(requested(call.name, call.version)))

    async def server_metadata(_) -> v2.ServerMetadataResponse:
        return messages.server_metadata()

    async def model_metadata(call: messages.ModelCall) -> v2.ModelMetadataResponse:
        number = requested(call.name, call.version)
        return messages.model_metadata(MODEL_NAME, [s.number for s in models.asked(number)])

    async def infer(call: messages.InferCall) -> v2.ModelInferResponse:
        answer = await door.core.predict(call.images, requested(call.name, call.version), None)
        number, probabilities = answer.served.number, answer.probabilities
        return messages.infer_response(MODEL_NAME, number, call.id, probabilities, call.raw)

    def empty(request_type) -> functools.partial:
        return functools.partial(messages.empty_call, request_type.DESCRIPTOR.full_name)

    methods = {
        "ServerLive": door.method("ServerLive", empty(v2.ServerLiveRequest), live, v2.ServerLiveResponse),
        "ServerReady": door.method("ServerReady", empty(v2.ServerReadyRequest), ready, v2.ServerReadyResponse),
        "ModelReady": door.method("ModelReady", messages.model_ready_call, model_ready, v2.ModelReadyResponse),
        "ServerMetadata": door.method(
            "ServerMetadata", empty(v2.ServerMetadataRequest), server_metadata, v2.ServerMetadataResponse
        ),
        "ModelMetadata": door.method(
            "ModelMetadata", messages.model_metadata_call, model_metadata, v2.ModelMetadataResponse
        ),
        "ModelInfer": door.method("infer", messages.infer_call, infer, v2.ModelInferResponse),
    }
    return [grpc.method_handlers_generic_handler(INFERENCE_SERVICE, methods)]
