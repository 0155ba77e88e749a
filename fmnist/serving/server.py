"""The prediction server: the registry's champion (`stable`) and its labeled versions (`canary`, ...)
behind TF Serving's REST API (Starlette on uvicorn) and its gRPC API, with Prometheus metrics.

    POST /v1/models/fashion-mnist[/versions/N | /labels/L]:predict       TF Serving's JSON predict
    GET  /v1/models/fashion-mnist[/versions/N | /labels/L]               the versions served, and their state
    GET  /v1/models/fashion-mnist[/versions/N | /labels/L]/metadata      the signature, and the registry's record
    POST /v1/models/fashion-mnist[/versions/N | /labels/L]:classify-png  PNG uploads (multipart/form-data)
    GET  /monitoring/prometheus/metrics                                  Prometheus metrics
    GET  /healthz                                                        alive
    GET  /readyz                                                         a verified champion is loaded
    gRPC PredictionService (Predict, GetModelMetadata), ModelService (GetModelStatus)   port 8500

Paths are matched as TF Serving matches them (case-insensitively; anything else under /v1/ is a
"Malformed request", 400); every refusal is an `{"error": ...}` body with the HTTP status TF Serving
gives its canonical code. Each answer names the registry version that made it (`X-Model-Version`)
and the label it was served as (`X-Model-Label`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from contextlib import asynccontextmanager

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fmnist.data.cache import SCALED
from fmnist.data.dataset import CLASS_NAMES
from fmnist.registry.labels import STABLE
from fmnist.registry.versions import Registry
from fmnist.serving import kserve, tfserving
from fmnist.serving.capture import Capture, CaptureOptions
from fmnist.serving.edge import Edge, EdgePlan, behind_edge
from fmnist.serving.errors import BadRequest, NotFound, NotReady, ServingError
from fmnist.serving.grpc_messages import MAX_MESSAGE_BYTES, MESSAGES, descriptor_files
from fmnist.serving.guard import (
    BodyBudget,
    Claim,
    ConcurrencyLimit,
    client_address,
    guarded_protocol,
    read_body,
)
from fmnist.serving.log_limits import RepeatLimiter, limit_repeats, nginx_kind
from fmnist.serving.metrics import PATH as METRICS_PATH
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import MODEL_NAME, ServedModels
from fmnist.serving.options import ServeOptions
from fmnist.serving.payloads import MAX_UPLOAD_BYTES, parse_pngs, parse_predict
from fmnist.serving.service import PredictionCore
from fmnist.serving.workers import BodyParsers

MAX_JSON_BYTES = 16 << 20  # 1,024 images as JSON floats take about 9 MB

log = logging.getLogger(__name__)


def create_app(registry: Registry, options: ServeOptions, edge: Edge | None = None) -> Starlette:
    """The application; with `edge`, nginx is started with it and stopped at its shutdown (SIGTERM included)."""
    metrics = ServingMetrics(MODEL_NAME)
    models = ServedModels(registry, options.poll_s, metrics, options.canary_share)
    capture = None
    if options.feedback_root and (options.capture_rate or options.capture_below):
        settings = CaptureOptions(
            options.feedback_root, options.capture_rate, options.capture_below, options.capture_flush_s
        )
        capture = Capture(registry.store, settings, metrics)
    core = PredictionCore(models, metrics, options.shadow_share, capture)
    budget = BodyBudget(options.max_body_bytes_in_flight, MAX_MESSAGE_BYTES, metrics.body_bytes.set)
    if options.grpc_port is not None:
        from fmnist.serving import grpc_api  # (registers the gRPC messages the parsers are told of)
    parsers = BodyParsers(options.parse_workers, descriptor_files(*MESSAGES) if options.grpc_port is not None else [])

    def serving_ready() -> bool:
        return STABLE in models.by_label and parsers.ready()

    @asynccontextmanager
    async def lifespan(app: Starlette):
        following = asyncio.create_task(models.follow())
        capturing = asyncio.create_task(capture.run()) if capture else None
        await parsers.start()
        grpc, checks = None, None
        if options.grpc_port is not None:
            checks = grpc_api.Health(serving_ready)
            door = grpc_api.GrpcDoor(core, budget, parsers, options.body_timeout_s, serving_ready)
            address = f"{options.host}:{options.grpc_port}"
            grpc = grpc_api.grpc_server(door, checks, address, options)
            await grpc.start()
            checking = asyncio.create_task(checks.follow())
            log.info("gRPC (TF Serving's PredictionService, ModelService; Health; reflection) on %s", address)
        watching = None
        if edge is not None:
            # From this (the main) thread: nginx is asked to die with the thread that starts it.
            edge.start()
            watching = asyncio.create_task(follow_edge(edge))
        yield
        if edge is not None:
            watching.cancel()
            edge.stop()
        if grpc is not None:
            checking.cancel()
            await grpc.stop(grace=2)
        following.cancel()
        if capturing:  # what is queued is written before the process ends
            capturing.cancel()
            await asyncio.gather(capturing, return_exceptions=True)
        parsers.close()

    async def refused(request: Request, exc: ServingError) -> JSONResponse:
        metrics.refusals.labels(exc.reason).inc()
        return error(exc.status, str(exc))

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> JSONResponse:
        served = models.resolve(label=STABLE)
        if not parsers.ready():
            raise NotReady("a body parser process died and its replacement is starting")
        labels = {label: s.version for label, s in models.by_label.items()}
        ready = {"status": "ready", "version": served.version, "model_sha256": served.model_sha256, "labels": labels}
        return JSONResponse(ready)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.page(), media_type=CONTENT_TYPE_LATEST)

    async def answered(api: str, answer) -> Response:
        """`answer()`'s response, counted in TF Serving's request metrics by its canonical code."""
        started = time.perf_counter()
        try:
            response = await answer()
        except ServingError as exc:
            metrics.answered(exc.code, api, "REST", time.perf_counter() - started)
            raise
        metrics.answered("OK", api, "REST", time.perf_counter() - started)
        return response

    async def body_of(request: Request, limit: int, claim: Claim) -> bytes:
        return await read_body(request.receive, request.headers, limit, claim, options.body_timeout_s)

    async def tf_serving_api(request: Request) -> Response:
        """TF Serving's paths, matched as it matches them: case-insensitively, under /v1/."""
        path, method = request.url.path, request.method
        if method == "POST" and (matched := tfserving.PREDICT_PATH.fullmatch(path)):
            return await post(request, *matched.groups())
        if method == "GET" and (matched := tfserving.STATUS_PATH.fullmatch(path)):
            return await get(*matched.groups())
        if path == "/v2" or path.startswith("/v2/"):
            return await open_inference_api(request, path, method)
        if path.lower().startswith("/v1/"):
            raise BadRequest(f"Malformed request: {method} {path[:200]}")
        raise NotFound(f"no such endpoint {path[:200]}; the model is {MODEL_NAME!r}, under /v1/models/")

    async def open_inference_api(request: Request, path: str, method: str) -> Response:
        """The Open Inference Protocol's (KServe v2) paths."""
        if method == "GET" and path in kserve.SERVER_PATHS:
            return JSONResponse(kserve.server_metadata())
        if method == "GET" and (health := kserve.HEALTH_PATH.fullmatch(path)):
            ready = health.group(1) == "live" or serving_ready()
            return JSONResponse({health.group(1): ready}, status_code=200 if ready else 503)
        matched = kserve.MODEL_PATH.fullmatch(path)
        if not matched:
            raise NotFound(f"no such endpoint {path[:200]}; the model is {MODEL_NAME!r}, under /v2/models/")
        name, version, verb = matched.groups()
        if version is not None and not kserve.VERSION.fullmatch(version):
            raise NotFound(f"Servable not found for request: Specific({name[:64]}, {version[:32]})")
        number, _ = tfserving.requested(name, version, None)
        if method == "POST" and verb == "/infer":
            with budget.claim(client_of(request)) as claim:
                return await answered("infer", lambda: infer(request, number, claim))
        if method == "GET" and verb == "/ready":
            ready = models.serves(number)
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)
        if method == "GET" and verb is None:
            served = models.asked(number)
            return JSONResponse(kserve.metadata(MODEL_NAME, [s.number for s in served]))
        raise BadRequest(f"Malformed request: {method} {path[:200]}")

    async def infer(request: Request, number: int | None, claim: Claim) -> Response:
        models.resolve(number)
        # The request's headers are checked before its body is read: a lie about the body is refused unread.
        json_length = kserve.declared_json_length(request.headers.getlist(kserve.JSON_LENGTH_HEADER))
        if request.headers.get("content-encoding", "identity") != "identity":
            raise BadRequest("a compressed body (Content-Encoding) is not accepted; send it as it is")
        body = await body_of(request, MAX_JSON_BYTES, claim)
        parsed = await parsers.run(kserve.parse_infer, body, json_length)
        answer = await core.predict(parsed.images, number, None)
        body, answer_json_length = kserve.infer_response(
            MODEL_NAME, answer.served.number, parsed.id, answer.probabilities, parsed.binary_output
        )
        if answer_json_length is None:
            return Response(body, media_type="application/json", headers=served_headers(answer))
        headers = {**served_headers(answer), "Inference-Header-Content-Length": str(answer_json_length)}
        return Response(body, media_type="application/octet-stream", headers=headers)

    async def post(request: Request, name: str, version: str | None, label: str | None, method: str) -> Response:
        method = method.lower()
        with budget.claim(client_of(request)) as claim:
            if method == "predict":
                return await answered("predict", lambda: predict(request, name, version, label, claim))
            if method == "classify-png":
                return await answered("classify-png", lambda: classify_png(request, name, version, label, claim))
            raise BadRequest(
                f"{method}: this model has one signature, {tfserving.SIGNATURE!r}, a predict signature; use :predict"
            )

    async def predict(request: Request, name: str, version: str | None, label: str | None, claim: Claim) -> Response:
        number, label = tfserving.requested(name, version, label)
        models.resolve(number, label)  # an unknown model, version or label is refused before its body is read
        parsed = await parsers.run(parse_predict, await body_of(request, MAX_JSON_BYTES, claim))
        answer = await core.predict(parsed.images, number, label)
        key = "outputs" if parsed.columnar else "predictions"
        body = orjson.dumps({key: answer.probabilities}, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json", headers=served_headers(answer))

    async def classify_png(
        request: Request, name: str, version: str | None, label: str | None, claim: Claim
    ) -> Response:
        number, label = tfserving.requested(name, version, label)
        models.resolve(number, label)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise BadRequest("send the PNG files as multipart/form-data (curl -F image=@shoe.png ...)")
        body = await body_of(request, MAX_UPLOAD_BYTES, claim)
        named = await parsers.run(parse_pngs, body, content_type, inline_bytes=0)
        pixels = SCALED[np.stack([image for _, image in named])]
        answer = await core.predict(pixels, number, label)
        results = []
        for (file, _), row in zip(named, answer.probabilities, strict=True):
            best = int(row.argmax())
            results.append(
                {
                    "file": file,
                    "class": CLASS_NAMES[best],
                    "index": best,
                    "probability": float(row[best]),
                    "version": answer.served.version,
                }
            )
        return JSONResponse({"results": results}, headers=served_headers(answer))

    async def get(name: str | None, version: str | None, label: str | None, metadata: str | None) -> Response:
        if name is None:
            raise BadRequest("Missing model name in request.")
        number, label = tfserving.requested(name, version, label)
        if metadata:
            return await answered("GetModelMetadata", lambda: metadata_of(number, label))
        return await answered("GetModelStatus", lambda: status_of(number, label))

    async def metadata_of(number: int | None, label: str | None) -> Response:
        served = models.resolve(number, label)
        return JSONResponse(tfserving.rest_metadata(served), headers={"X-Model-Version": served.version})

    async def status_of(number: int | None, label: str | None) -> Response:
        if number is None and label is None:
            served = models.served()
            status = tfserving.status_response(served, models.problems.get(STABLE))
            return JSONResponse(tfserving.as_json(status), status_code=200 if served else 503)
        served = models.resolve(number, label)
        return JSONResponse(tfserving.as_json(tfserving.status_response([served])))

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route(METRICS_PATH, prometheus),
        Route("/{rest:path}", tf_serving_api, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    ]
    handlers = {ServingError: refused, HTTPException: http_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.models = models
    return app


def client_of(request: Request) -> str:
    return client_address(request.client.host if request.client else None, request.headers.get("x-forwarded-for"))


def served_headers(answer) -> dict[str, str]:
    return {"X-Model-Version": answer.served.version, "X-Model-Label": answer.label}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)  # TF Serving's error body


def serve(registry: Registry, options: ServeOptions, edge_plan: EdgePlan | None = None) -> None:
    """Run the server until interrupted (one process: each model is loaded once). With `edge_plan`,
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
        ConcurrencyLimit(create_app(registry, app_options, edge), app_options.max_connections),
        host=app_options.host,
        port=app_options.port,
        http=guarded_protocol(app_options.header_timeout_s, app_options.body_timeout_s, app_options.max_connections),
        access_log=app_options.access_log,
        log_level="info",
    )
    limit_repeats(logging.getLogger("uvicorn"))  # (uvicorn's loggers have handlers of their own)
    uvicorn.Server(config).run()


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
