"""TF Serving's gRPC API (tensorflow-serving-api's messages, without TensorFlow:
`fmnist.serving.protos.tensorflow_serving`): PredictionService's Predict and GetModelMetadata,
and ModelService's GetModelStatus, on their own port (8500, TF Serving's), in the REST server's event
loop, sharing its models and batcher; beside them `grpc.health.v1.Health` (what a Kubernetes gRPC probe
asks) and server reflection (what grpcurl lists services with). Classify, Regress, MultiInference and
HandleReloadConfigRequest answer UNIMPLEMENTED.

Predict takes the signature's input `images`: uint8 raw pixels (the export's dtype) or float32 already
in [0, 1], shaped (n, 28, 28) or (n, 784); it answers `probabilities`, float32 (n, 10).

Every method is registered to take its request as raw bytes (a unary call is a stream of one message on
the wire), so that gRPC keeps REST's guards: the call waits for its message under the body deadline and
may be cut off to make room, its bytes are taken from the one byte budget as they arrive, and a big
message is parsed in the body parsers' worker processes, never on the event loop.
"""

from __future__ import annotations

import asyncio
import inspect

import grpc
import numpy as np
from google.protobuf.json_format import ParseDict
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fmnist.registry.labels import STABLE
from fmnist.serving import tfserving
from fmnist.serving.errors import BadRequest, ServingError, TooSlow
from fmnist.serving.grpc_messages import MAX_MESSAGE_BYTES, Spec, metadata_call, predict_call, status_call
from fmnist.serving.guard import BodyBudget, Claim, client_address
from fmnist.serving.kserve_grpc import INFERENCE_SERVICE, kserve_handlers
from fmnist.serving.models import Served
from fmnist.serving.protos.tensorflow_serving import message_class
from fmnist.serving.service import PredictionCore
from fmnist.serving.workers import BodyParsers
from fmnist.training.export import OUTPUT, SIGNATURE

# nginx's default; gRPC's is unbounded (2^32). Not lower: a client multiplexing as many calls as the limit
# on one channel meets REFUSED_STREAM in the race between its stream closing and the server's count (at 16,
# 16 clients on one channel had a fifth of their calls refused).
MAX_STREAMS_PER_CONNECTION = 128
PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
HEALTH_SERVICE = "grpc.health.v1.Health"
SMALL_MESSAGE_BYTES = 64 << 10  # a request to health or reflection
CHECKED = ("", PREDICTION_SERVICE, MODEL_SERVICE, INFERENCE_SERVICE)  # what Health reports on
PREDICT_RESPONSE = message_class("tensorflow.serving.PredictResponse")
METADATA_RESPONSE = message_class("tensorflow.serving.GetModelMetadataResponse")
STATUS_RESPONSE = message_class("tensorflow.serving.GetModelStatusResponse")


def spec_choice(spec: Spec) -> tuple[int | None, str | None]:
    """The version or label a request's ModelSpec names, checked as TF Serving checks it."""
    if spec.signature not in ("", SIGNATURE):
        raise BadRequest(f'Serving signature name: "{spec.signature[:100]}" not found in signature def')
    return tfserving.requested(spec.name, spec.version, spec.label)


def model_spec_message(served: Served):
    return ParseDict(tfserving.model_spec(served), message_class("tensorflow.serving.ModelSpec")())


def status_message(served: list[Served], problem: str | None = None):
    """REST's status answer as TF Serving's message (the same dict: the two cannot drift apart)."""
    return ParseDict(tfserving.status_response(served, problem), STATUS_RESPONSE())


def metadata_message(served: Served):
    response = METADATA_RESPONSE(model_spec=model_spec_message(served))
    signatures = ParseDict(tfserving.signature_def_map(), message_class("tensorflow.serving.SignatureDefMap")())
    response.metadata["signature_def"].Pack(signatures)
    return response


def probabilities_tensor(probabilities: np.ndarray):
    return message_class("tensorflow.TensorProto")(
        dtype="DT_FLOAT",
        tensor_shape={"dim": [{"size": d} for d in probabilities.shape]},
        tensor_content=probabilities.astype("<f4").tobytes(),
    )


class GrpcDoor:
    """What every method shares: its message received under the guards, parsed off the loop when big,
    and its answer or refusal counted."""

    def __init__(self, core: PredictionCore, budget: BodyBudget, parsers: BodyParsers, body_s: float, ready) -> None:
        self.core, self.budget, self.parsers, self.body_s = core, budget, parsers, body_s
        self.ready = ready  # the server's readiness (a verified champion, parsers alive): one rule, every door

    async def message(self, requests, claim: Claim) -> bytes:
        self.budget.await_message(claim)
        try:
            async with asyncio.timeout(self.body_s):
                message = await anext(requests, None)
        except TimeoutError:
            raise TooSlow(f"the request message was not in within {self.body_s:g} s") from None
        except asyncio.CancelledError:
            claim.raise_if_cut_off()
            raise
        if message is None:
            raise BadRequest("the call ended without a request message")
        claim.take(len(message))
        claim.arrived()
        return message

    def method(self, api: str, parse, answer, response_type) -> grpc.RpcMethodHandler:
        """A method handler: the raw request `parse`d (off the loop when big), then `answer`ed, counted as `api`."""

        async def respond(requests, context):
            with self.budget.claim(client_of(context)) as claim:
                return await answer(await self.parsers.run(parse, await self.message(requests, claim)))

        async def handle(requests, context):
            try:  # counted as REST counts it (`PredictionCore.counted`: the metrics, and the evidence)
                return await self.core.counted(api, "GRPC", lambda: respond(requests, context))
            except ServingError as exc:
                self.core.metrics.refusals.labels(exc.reason).inc()
                await context.abort(grpc.StatusCode[exc.code], str(exc))

        return grpc.stream_unary_rpc_method_handler(handle, response_serializer=response_type.SerializeToString)


def client_of(context) -> str:
    """A call's client: its peer's address ("ipv4:127.0.0.2:5000"), or the one the edge forwards."""
    peer = context.peer() or ""
    host = peer.split(":", 1)[-1].rsplit(":", 1)[0].strip("[]") if peer.startswith(("ipv4:", "ipv6:")) else peer
    forwarded = dict(context.invocation_metadata() or ()).get("x-forwarded-for")
    return client_address(host, forwarded)


def tf_serving_handlers(door: GrpcDoor) -> list[grpc.GenericRpcHandler]:
    models = door.core.models

    async def predict(call):
        version, label = spec_choice(call.spec)
        result = await door.core.predict(call.images, version, label)
        response = PREDICT_RESPONSE(model_spec=model_spec_message(result.served))
        response.outputs[OUTPUT].CopyFrom(probabilities_tensor(result.probabilities))
        return response

    async def metadata(call):
        spec, fields = call
        if unknown := set(fields) - {"signature_def"}:
            raise BadRequest(f"Metadata field {sorted(unknown)[0]} is not supported")
        if not fields:
            raise BadRequest("GetModelMetadataRequest must specify at least one metadata_field")
        return metadata_message(models.resolve(*tfserving.requested(spec.name, spec.version, spec.label)))

    async def status(spec: Spec):
        version, label = tfserving.requested(spec.name, spec.version, spec.label)
        if version is None and label is None:
            return status_message(models.served(), models.problems.get(STABLE))
        return status_message([models.resolve(version, label)])

    prediction = {
        "Predict": door.method("predict", predict_call, predict, PREDICT_RESPONSE),
        "GetModelMetadata": door.method("GetModelMetadata", metadata_call, metadata, METADATA_RESPONSE),
    }
    model = {"GetModelStatus": door.method("GetModelStatus", status_call, status, STATUS_RESPONSE)}
    return [
        grpc.method_handlers_generic_handler(PREDICTION_SERVICE, prediction),
        grpc.method_handlers_generic_handler(MODEL_SERVICE, model),
    ]


class Health(health.aio.HealthServicer):
    """`grpc.health.v1.Health`: SERVING while the server is ready (a verified champion, parsers alive), for
    the whole server ("") and each service. Check answers from the state now; Watch streams follow it
    through `follow`, which looks every second."""

    def __init__(self, ready) -> None:
        super().__init__()
        self.ready = ready

    def status(self) -> int:
        ok = health_pb2.HealthCheckResponse
        return ok.SERVING if self.ready() else ok.NOT_SERVING

    async def Check(self, request, context):
        if request.service in CHECKED:
            return health_pb2.HealthCheckResponse(status=self.status())
        return await super().Check(request, context)

    async def follow(self, every_s: float = 1.0) -> None:
        while True:
            status = self.status()
            for service in CHECKED:
                await self.set(service, status)
            await asyncio.sleep(every_s)


class SmallMessages(grpc.aio.ServerInterceptor):
    """Health and reflection take their requests through their packages' own handlers, outside the byte
    budget: a request to them over SMALL_MESSAGE_BYTES (a name of a few hundred bytes is what they need) is
    refused RESOURCE_EXHAUSTED before it is parsed or kept (64 Watch calls naming 3.9 MB services held
    585 MiB). The methods that take raw bytes (`GrpcDoor`) are left as they are."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def checked(raw: bytes):
            return TOO_BIG if len(raw) > SMALL_MESSAGE_BYTES else parse(raw)

        if handler.unary_unary:
            return handler._replace(request_deserializer=checked, unary_unary=refusing_too_big(handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(request_deserializer=checked, unary_stream=refusing_too_big(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(request_deserializer=checked, stream_stream=streaming_small(handler.stream_stream))
        return handler


async def refuse_too_big(context) -> None:
    limit = f"requests to this service are at most {SMALL_MESSAGE_BYTES:,} bytes"
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, limit)


def refusing_too_big(behaviour):
    """A unary-request behaviour (answering by return, by `context.write`, or by yielding) that refuses TOO_BIG."""
    if inspect.isasyncgenfunction(behaviour):

        async def yielding(request, context):
            if request is TOO_BIG:
                await refuse_too_big(context)
            async for answer in behaviour(request, context):
                yield answer

        return yielding

    async def answering(request, context):
        if request is TOO_BIG:
            await refuse_too_big(context)
        return await behaviour(request, context)

    return answering


def streaming_small(behaviour):
    """A streaming-request behaviour (reflection's) whose requests over the limit end the call."""

    async def checked_requests(requests, context):
        async for request in requests:
            if request is TOO_BIG:
                await refuse_too_big(context)
            yield request

    async def streaming(requests, context):
        async for answer in behaviour(checked_requests(requests, context), context):
            yield answer

    return streaming


TOO_BIG = object()  # what a request over SMALL_MESSAGE_BYTES deserializes to


def grpc_server(door: GrpcDoor, checks: Health, address: str, options) -> grpc.aio.Server:
    """The gRPC server, bound to `address` (start it in the event loop that serves REST). gRPC core's own
    limits match REST's: a connection must finish its handshake within the head deadline, an idle one is
    closed, none lives for ever, and each carries a bounded number of streams."""
    core_options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.server_handshake_timeout_ms", int(options.header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(options.idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(options.connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(options.body_timeout_s * 1000)),
        ("grpc.so_reuseport", 0),  # a port taken by another process is an error, not shared
    ]
    # No cap on calls at once: gRPC counts a call from its headers, so a cap let calls that never send
    # their message refuse everyone. Calls waiting for their message are bounded by the byte budget
    # (`BodyBudget.await_message`), the rest by the streams a connection may carry.
    server = grpc.aio.server(options=core_options, interceptors=[SmallMessages()])
    server.add_generic_rpc_handlers(tf_serving_handlers(door))
    server.add_generic_rpc_handlers(kserve_handlers(door))
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    services = (PREDICTION_SERVICE, MODEL_SERVICE, INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return server
