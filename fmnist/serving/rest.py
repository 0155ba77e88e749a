"""What every REST route shares: the serving state `create_app` builds (reached from a request as
`request.app.state.serving`), the refusals as TF Serving's `{"error": ...}` bodies, the request
metrics, and the route that claims an API's paths as its handlers read them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from fmnist.registry.labels import STABLE
from fmnist.serving.capture import Capture
from fmnist.serving.errors import ServingError
from fmnist.serving.guard import BodyBudget, Claim, client_address, read_body
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import ServedModels
from fmnist.serving.options import ServeOptions
from fmnist.serving.service import Answer, PredictionCore
from fmnist.serving.workers import BodyParsers

MAX_JSON_BYTES = 16 << 20  # 1,024 images as JSON floats take about 9 MB
# What a route for an API's paths takes; any other method is Starlette's 405.
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@dataclass(frozen=True)
class ServingState:
    """The models in service and what answers with them, shared by every route (and by gRPC)."""

    models: ServedModels
    metrics: ServingMetrics
    core: PredictionCore
    budget: BodyBudget
    parsers: BodyParsers
    capture: Capture | None
    options: ServeOptions

    def ready(self) -> bool:
        """A verified champion is loaded and the body parsers are up."""
        return STABLE in self.models.by_label and self.parsers.ready()

    async def answered(self, api: str, answer: Callable[[], Awaitable[Response]]) -> Response:
        """`answer()`'s response, counted in TF Serving's request metrics by its canonical code (and, for a
        prediction, in the evidence of the version it reached: `PredictionCore.counted`)."""
        return await self.core.counted(api, "REST", answer)

    async def body_of(self, request: Request, limit: int, claim: Claim) -> bytes:
        return await read_body(request.receive, request.headers, limit, claim, self.options.body_timeout_s)


def serving_of(request: Request) -> ServingState:
    return request.app.state.serving


class ApiRoute(Route):
    """One API's paths: those `owns` claims, read as the handlers read them (`request.url.path`), with
    any method in METHODS; `endpoint` tells its paths apart."""

    def __init__(self, owns: Callable[[str], bool], endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        super().__init__("/{path:path}", endpoint, methods=METHODS)
        self.owns = owns

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and self.owns(URL(scope=scope).path):
            return super().matches(scope)
        return Match.NONE, {}


def client_of(request: Request) -> str:
    return client_address(request.client.host if request.client else None, request.headers.get("x-forwarded-for"))


def served_headers(answer: Answer) -> dict[str, str]:
    """Each answer names the registry version that made it and the label it was served as."""
    return {"X-Model-Version": answer.served.version, "X-Model-Label": answer.label}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)  # TF Serving's error body


async def refused(request: Request, exc: ServingError) -> JSONResponse:
    serving_of(request).metrics.refusals.labels(exc.reason).inc()
    return error(exc.status, str(exc))


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


EXCEPTION_HANDLERS = {ServingError: refused, HTTPException: http_error}
