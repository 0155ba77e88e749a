"""The Open Inference Protocol's (KServe v2) REST routes, under /v2 (what each answers: `kserve`).

GET  /v2                                            server metadata
GET  /v2/health/live | /v2/health/ready
GET  /v2/models/fashion-mnist[/versions/N]          metadata
GET  /v2/models/fashion-mnist[/versions/N]/ready
POST /v2/models/fashion-mnist[/versions/N]/infer    inference, JSON or with binary tensors
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fmnist.serving import kserve, tfserving
from fmnist.serving.errors import BadRequest, NotFound
from fmnist.serving.guard import Claim
from fmnist.serving.models import MODEL_NAME
from fmnist.serving.rest import MAX_JSON_BYTES, client_of, served_headers, serving_of


def owns(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def api(request: Request) -> Response:
    serving, path, method = serving_of(request), request.url.path, request.method
    if method == "GET" and path in kserve.SERVER_PATHS:
        return JSONResponse(kserve.server_metadata())
    if method == "GET" and (health := kserve.HEALTH_PATH.fullmatch(path)):
        ready = health.group(1) == "live" or serving.ready()
        return JSONResponse({health.group(1): ready}, status_code=200 if ready else 503)
    matched = kserve.MODEL_PATH.fullmatch(path)
    if not matched:
        raise NotFound(f"no such endpoint {path[:200]}; the model is {MODEL_NAME!r}, under /v2/models/")
    name, version, verb = matched.groups()
    if version is not None and not kserve.VERSION.fullmatch(version):
        raise NotFound(f"Servable not found for request: Specific({name[:64]}, {version[:32]})")
    number, _ = tfserving.requested(name, version, None)
    if method == "POST" and verb == "/infer":
        with serving.budget.claim(client_of(request)) as claim:
            return await serving.answered("infer", lambda: infer(request, number, claim))
    if method == "GET" and verb == "/ready":
        ready = serving.models.serves(number)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)
    if method == "GET" and verb is None:
        served = serving.models.asked(number)
        return JSONResponse(kserve.metadata(MODEL_NAME, [s.number for s in served]))
    raise BadRequest(f"Malformed request: {method} {path[:200]}")


async def infer(request: Request, number: int | None, claim: Claim) -> Response:
    serving = serving_of(request)
    serving.core.resolve(number, None)
    # The request's headers are checked before its body is read: a lie about the body is refused unread.
    json_length = kserve.declared_json_length(request.headers.getlist(kserve.JSON_LENGTH_HEADER))
    if request.headers.get("content-encoding", "identity") != "identity":
        raise BadRequest("a compressed body (Content-Encoding) is not accepted; send it as it is")
    body = await serving.body_of(request, MAX_JSON_BYTES, claim)
    parsed = await serving.parsers.run(kserve.parse_infer, body, json_length)
    answer = await serving.core.predict(parsed.images, number, None)
    body, answer_json_length = kserve.infer_response(
        MODEL_NAME, answer.served.number, parsed.id, answer.probabilities, parsed.binary_output
    )
    if answer_json_length is None:
        return Response(body, media_type="application/json", headers=served_headers(answer))
    headers = {**served_headers(answer), "Inference-Header-Content-Length": str(answer_json_length)}
    return Response(body, media_type="application/octet-stream", headers=headers)
