"""The operator's routes: liveness, readiness, and the Prometheus metrics.

GET /healthz                          alive
GET /readyz                           a verified champion is loaded (its version, hash, and the labels)
GET /monitoring/prometheus/metrics    Prometheus metrics
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fmnist.registry.labels import STABLE
from fmnist.serving.errors import NotReady
from fmnist.serving.metrics import PATH as METRICS_PATH
from fmnist.serving.rest import serving_of


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "alive"})


async def readyz(request: Request) -> JSONResponse:
    serving = serving_of(request)
    served = serving.models.resolve(label=STABLE)
    if not serving.parsers.ready():
        raise NotReady("a body parser process died and its replacement is starting")
    labels = {label: s.version for label, s in serving.models.by_label.items()}
    ready = {"status": "ready", "version": served.version, "model_sha256": served.model_sha256, "labels": labels}
    return JSONResponse(ready)


async def prometheus(request: Request) -> Response:
    return Response(serving_of(request).metrics.page(), media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/healthz", healthz), Route("/readyz", readyz), Route(METRICS_PATH, prometheus)]
