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
from fmnist.serving.errors import BadRequest, NotFound, ServingError
from fmnist.serving.guard import BodyBudget, guarded_protocol, read_body
from fmnist.serving.metrics import PATH as METRICS_PATH
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import MODEL_NAME, ServedModels
from fmnist.serving.options import ServeOptions
from fmnist.serving.payloads import MAX_UPLOAD_BYTES, BodyParsers, parse_pngs, parse_predict
from fmnist.serving.service import PredictionCore

MAX_JSON_BYTES = 16 << 20  # 1,024 images as JSON floats take about 9 MB

log = logging.getLogger(__name__)


def create_app(registry: Registry, options: ServeOptions) -> Starlette:
    metrics = ServingMetrics(MODEL_NAME)
    models = ServedModels(registry, options.poll_s, metrics, options.canary_share)
    capture = None
    if options.feedback_root and (options.capture_rate or options.capture_below):
        settings = CaptureOptions(
            options.feedback_root, options.capture_rate, options.capture_below, options.capture_flush_s
        )
        capture = Capture(registry.store, settings, metrics)
    core = PredictionCore(models, metrics, options.shadow_share, capture)
    budget = BodyBudget(options.max_body_bytes_in_flight, metrics.body_bytes.set)
    parsers = BodyParsers(options.parse_workers)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        following = asyncio.create_task(models.follow())
        capturing = asyncio.create_task(capture.run()) if capture else None
        await parsers.start()
        grpc = None
        if options.grpc_port is not None:
            from fmnist.serving.grpc_api import grpc_server

            grpc = grpc_server(core, options.host, options.grpc_port, options.max_connections)
            await grpc.start()
            log.info("gRPC (TF Serving's PredictionService, ModelService) on %s:%d", options.host, options.grpc_port)
        yield
        if grpc is not None:
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

    async def body_of(request: Request, limit: int, held: list[int]) -> bytes:
        return await read_body(request.receive, request.headers, limit, budget, options.body_s, held)

    async def tf_serving_api(request: Request) -> Response:
        """TF Serving's paths, matched as it matches them: case-insensitively, under /v1/."""
        path, method = request.url.path, request.method
        if method == "POST" and (matched := tfserving.PREDICT_PATH.fullmatch(path)):
            return await post(request, *matched.groups())
        if method == "GET" and (matched := tfserving.STATUS_PATH.fullmatch(path)):
            return await get(*matched.groups())
        if path.startswith("/v2/"):
            return await open_inference_api(request, path, method)
        if path.lower().startswith("/v1/"):
            raise BadRequest(f"Malformed request: {method} {path[:200]}")
        raise NotFound(f"no such endpoint {path[:200]}; the model is {MODEL_NAME!r}, under /v1/models/")

    async def open_inference_api(request: Request, path: str, method: str) -> Response:
        """The Open Inference Protocol's (KServe v2) paths."""
        if method == "GET" and (health := kserve.HEALTH_PATH.fullmatch(path)):
            ready = health.group(1) == "live" or STABLE in models.by_label
            return JSONResponse({health.group(1): ready}, status_code=200 if ready else 503)
        matched = kserve.MODEL_PATH.fullmatch(path)
        if not matched:
            raise NotFound(f"no such endpoint {path[:200]}; the model is {MODEL_NAME!r}, under /v2/models/")
        name, version, verb = matched.groups()
        if version is not None and not version.isdigit():
            raise NotFound(f"Servable not found for request: Specific({name[:64]}, {version[:32]})")
        number, _ = tfserving.requested(name, version, None)
        if method == "POST" and verb == "/infer":
            held = [0]
            try:
                return await answered("infer", lambda: infer(request, number, held))
            finally:
                budget.give(held[0])
        if method == "GET" and verb == "/ready":
            ready = bool(models.served()) if number is None else any(s.number == number for s in models.served())
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)
        if method == "GET" and verb is None:
            served = models.served() if number is None else [models.resolve(number)]
            return JSONResponse(kserve.metadata(MODEL_NAME, [s.number for s in served]))
        raise BadRequest(f"Malformed request: {method} {path[:200]}")

    async def infer(request: Request, number: int | None, held: list[int]) -> Response:
        models.resolve(number)
        parsed = await parsers.run(kserve.parse_infer, await body_of(request, MAX_JSON_BYTES, held))
        answer = await core.predict(parsed.images, number, None)
        body = kserve.infer_response(MODEL_NAME, answer.served.number, parsed.id, answer.probabilities)
        return Response(body, media_type="application/json", headers=served_headers(answer))

    async def post(request: Request, name: str, version: str | None, label: str | None, method: str) -> Response:
        method = method.lower()
        held = [0]
        try:
            if method == "predict":
                return await answered("predict", lambda: predict(request, name, version, label, held))
            if method == "classify-png":
                return await answered("classify-png", lambda: classify_png(request, name, version, label, held))
            raise BadRequest(
                f"{method}: this model has one signature, {tfserving.SIGNATURE!r}, a predict signature; use :predict"
            )
        finally:
            budget.give(held[0])

    async def predict(request: Request, name: str, version: str | None, label: str | None, held) -> Response:
        number, label = tfserving.requested(name, version, label)
        models.resolve(number, label)  # an unknown model, version or label is refused before its body is read
        parsed = await parsers.run(parse_predict, await body_of(request, MAX_JSON_BYTES, held))
        answer = await core.predict(parsed.images, number, label)
        key = "outputs" if parsed.columnar else "predictions"
        body = orjson.dumps({key: answer.probabilities}, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, media_type="application/json", headers=served_headers(answer))

    async def classify_png(request: Request, name: str, version: str | None, label: str | None, held) -> Response:
        number, label = tfserving.requested(name, version, label)
        models.resolve(number, label)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise BadRequest("send the PNG files as multipart/form-data (curl -F image=@shoe.png ...)")
        named = await parsers.run(parse_pngs, await body_of(request, MAX_UPLOAD_BYTES, held), content_type)
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


def served_headers(answer) -> dict[str, str]:
    return {"X-Model-Version": answer.served.version, "X-Model-Label": answer.label}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)  # TF Serving's error body


def serve(registry: Registry, options: ServeOptions) -> None:
    """Run the server until interrupted (one process: each model is loaded once)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info(
        "Serving the champion of %s on http://%s:%d (registry read every %g s)",
        registry.root,
        options.host,
        options.port,
        options.poll_s,
    )
    config = uvicorn.Config(
        create_app(registry, options),
        host=options.host,
        port=options.port,
        # Beyond `max_connections` open requests uvicorn answers 503 at once: memory stays bounded under overload.
        limit_concurrency=options.max_connections,
        http=guarded_protocol(options.header_s),
        access_log=options.access_log,
        log_level="info",
    )
    uvicorn.Server(config).run()
