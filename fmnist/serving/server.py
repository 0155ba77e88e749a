"""The prediction server: the registry's champion (`stable`) and its labeled versions (`canary`, ...)
behind TF Serving's REST API (Starlette on uvicorn) and its gRPC API, KServe's v2 API, with Prometheus
metrics. `create_app` wires them; each API's routes are a module of their own:

    /v1/...                            TF Serving's REST API          rest_tfserving
    /v2/...                            the Open Inference Protocol     rest_kserve
    /healthz, /readyz, /monitoring/... the operator's routes           rest_ops
    gRPC PredictionService (Predict, GetModelMetadata), ModelService (GetModelStatus), KServe's
    GRPCInferenceService; Health; reflection (port 8500)               grpc_api

Every refusal is an `{"error": ...}` body with the HTTP status TF Serving gives its canonical code
(`rest`). Each answer names the registry version that made it (`X-Model-Version`) and the label it was
served as (`X-Model-Label`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from fmnist.registry.versions import Registry
from fmnist.serving import rest_kserve, rest_ops, rest_tfserving
from fmnist.serving.capture import Capture, CaptureOptions
from fmnist.serving.edge import Edge, EdgePlan, behind_edge
from fmnist.serving.evidence import EvidenceRecorder, EvidenceWriter
from fmnist.serving.grpc_messages import MAX_MESSAGE_BYTES
from fmnist.serving.guard import BodyBudget, ConcurrencyLimit, guarded_protocol
from fmnist.serving.log_limits import RepeatLimiter, limit_repeats, nginx_kind
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import MODEL_NAME, ModelLoader, ServedModels, load_model
from fmnist.serving.options import ServeOptions
from fmnist.serving.rest import EXCEPTION_HANDLERS, ApiRoute, ServingState
from fmnist.serving.service import PredictionCore
from fmnist.serving.workers import BodyParsers

log = logging.getLogger(__name__)


def create_app(
    registry: Registry, options: ServeOptions, edge: Edge | None = None, load: ModelLoader = load_model
) -> Starlette:
    """The application, serving the models `load` loads (the Keras ones); with `edge`, nginx is started
    with it and stopped at its shutdown (SIGTERM included)."""
    routes = [
        *rest_ops.ROUTES,
        ApiRoute(rest_kserve.owns, rest_kserve.api),
        ApiRoute(rest_tfserving.owns, rest_tfserving.api),
        ApiRoute(lambda path: True, rest_tfserving.no_such_endpoint),  # TF Serving's 404
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.serving = serving_state(registry, options, load)
    app.state.edge = edge
    return app


def serving_state(registry: Registry, options: ServeOptions, load: ModelLoader) -> ServingState:
    metrics = ServingMetrics(MODEL_NAME)
    models = ServedModels(registry, options.poll_s, metrics, options.canary_share, load)
    capture = None
    if options.feedback_root and (options.capture_rate or options.capture_below):
        settings = CaptureOptions(
            options.feedback_root, options.capture_rate, options.capture_below, options.capture_flush_s
        )
        capture = Capture(registry.store, settings, metrics)
    evidence = EvidenceRecorder(metrics) if options.evidence_window_s else None
    core = PredictionCore(models, metrics, options.shadow_share, capture, evidence)
    budget = BodyBudget(options.max_body_bytes_in_flight, MAX_MESSAGE_BYTES, metrics.body_bytes.set)
    parsers = BodyParsers(options.parse_workers)
    return ServingState(models, metrics, core, budget, parsers, capture, options)


@asynccontextmanager
async def lifespan(app: Starlette):
    """Following the registry, capturing, writing evidence, the body parsers, gRPC and the edge: started, and
    stopped after."""
    serving, edge, options = app.state.serving, app.state.edge, app.state.serving.options
    following = asyncio.create_task(serving.models.follow())
    capturing = asyncio.create_task(serving.capture.run()) if serving.capture else None
    recording = None
    if serving.core.evidence:
        registry = serving.models.registry
        writer = EvidenceWriter(
            serving.core.evidence, registry.store, registry.root, options.evidence_window_s, serving.metrics
        )
        recording = asyncio.create_task(writer.run())
    grpc = checking = watching = None
    try:  # a start that fails half-way (the edge's nginx refused, a port taken) stops what it had started
        await serving.parsers.start()
        if options.grpc_port is not None:
            from fmnist.serving import grpc_api

            checks = grpc_api.Health(serving.ready)
            door = grpc_api.GrpcDoor(
                serving.core, serving.budget, serving.parsers, options.body_timeout_s, serving.ready
            )
            address = f"{options.host}:{options.grpc_port}"
            grpc = grpc_api.grpc_server(door, checks, address, options)
            await grpc.start()
            checking = asyncio.create_task(checks.follow())
            log.info("gRPC (TF Serving's PredictionService, ModelService; Health; reflection) on %s", address)
        if edge is not None:
            # From this (the main) thread: nginx is asked to die with the thread that starts it.
            edge.start()
            watching = asyncio.create_task(follow_edge(edge))
        yield
    finally:
        await stop_serving(serving, edge, grpc, [watching, checking], following, [capturing, recording])


async def stop_serving(serving: ServingState, edge, grpc, followers: list, following, writers: list) -> None:
    """Stop, in order: the edge, gRPC, the shadow calls, following the registry, then the writers (what is
    queued, and the evidence's partial window, are written before the process ends, bounded)."""
    for task in followers:
        if task is not None:
            task.cancel()
    if edge is not None:
        edge.stop()
    if grpc is not None:
        await grpc.stop(grace=2)
    await serving.core.finish_shadows()  # while the canary is still loaded: its answers are the last evidence
    following.cancel()
    stopping = [task for task in writers if task]
    for task in stopping:
        task.cancel()
    await asyncio.gather(*stopping, return_exceptions=True)
    serving.parsers.close()


def serve(
    registry: Registry, options: ServeOptions, edge_plan: EdgePlan | None = None, load: ModelLoader = load_model
) -> None:
    """Run the server until interrupted (one process: each model is loaded once, by `load`). With `edge_plan`,
    nginx takes the host and ports of `options` and the application listens behind it on loopback."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_repeats()
    raise_descriptor_limit()
    app_options, edge = options, None
    if edge_plan is not None:
        app_options, addresses = behind_edge(options, edge_plan)
        edge = Edge(addresses, edge_plan.limits, edge_log)
    log.info(
        "Serving the champion of %s on http://%s:%d (registry read every %g s)%s",
        registry.root,
        options.host,
        options.port,
        options.poll_s,
        " through the edge (nginx)" if edge else "",
    )
    config = uvicorn.Config(
        # Beyond `max_connections` requests at once a 503 at once: memory stays bounded under overload.
        ConcurrencyLimit(create_app(registry, app_options, edge, load), app_options.max_connections),
        host=app_options.host,
        port=app_options.port,
        http=guarded_protocol(app_options.header_timeout_s, app_options.body_timeout_s, app_options.max_connections),
        access_log=app_options.access_log,
        log_level="info",
    )
    limit_repeats(logging.getLogger("uvicorn"))  # (uvicorn's loggers have handlers of their own)
    uvicorn.Server(config).run()  # (a start that fails exits with uvicorn's STARTUP_FAILURE, 3)


EDGE_LOG = logging.getLogger("fmnist.serving.edge.nginx")
EDGE_LINES = RepeatLimiter()


def edge_log(line: str) -> None:
    """One line of nginx's error log, into the server's log, at most a few of each kind a minute."""
    admitted, held_back = EDGE_LINES.admit(nginx_kind(line))
    if admitted:
        EDGE_LOG.warning("%s%s", line, f" ({held_back:,} like it held back)" if held_back else "")


async def follow_edge(edge: Edge, every_s: float = 0.5) -> None:
    """nginx gone means no client can reach the server: stop it (SIGTERM, so that the shutdown runs and the
    process ends as terminated, not as a success a supervisor would not restart)."""
    while not edge.died():
        await asyncio.sleep(every_s)
    log.error("the edge (nginx) exited (%s); stopping the server", edge.process.returncode)
    os.kill(os.getpid(), signal.SIGTERM)


def raise_descriptor_limit() -> None:
    """Take the hard limit on open files as the soft one (a server's connections are files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
