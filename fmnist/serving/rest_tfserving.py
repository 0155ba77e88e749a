"""TF Serving's REST API, under /v1/, with its paths matched as TF Serving matches them: case-insensitively,
and anything else under /v1/ a "Malformed request" (400).

    POST /v1/models/fashion-mnist[/versions/N | /labels/L]:predict       TF Serving's JSON predict
    GET  /v1/models/fashion-mnist[/versions/N | /labels/L]               the versions served, and their state
    GET  /v1/models/fashion-mnist[/versions/N | /labels/L]/metadata      the signature, and the registry's record
    POST /v1/models/fashion-mnist[/versions/N | /labels/L]:classify-png  PNG uploads (multipart/form-data)

A path under no API gets TF Serving's 404 (`no_such_endpoint`).
"""

from __future__ import annotations

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fmnist.data.cache import SCALED
from fmnist.data.dataset import CLASS_NAMES
from fmnist.registry.labels import STABLE
from fmnist.serving import tfserving
from fmnist.serving.errors import BadRequest, NotFound
from fmnist.serving.guard import Claim
from fmnist.serving.models import MODEL_NAME
from fmnist.serving.payloads import MAX_UPLOAD_BYTES, parse_pngs, parse_predict
from fmnist.serving.rest import MAX_JSON_BYTES, ServingState, client_of, served_headers, serving_of


def owns(path: str) -> bool:
    return path.lower().startswith("/v1/")


async def api(request: Request) -> Response:
    path, method = request.url.path, request.method
    if method == "POST" and (matched := tfserving.PREDICT_PATH.fullmatch(path)):
        return await post(request, *matched.groups())
    if method == "GET" and (matched := tfserving.STATUS_PATH.fullmatch(path)):
        return await get(serving_of(request), *matched.groups())
    raise BadRequest(f"Malformed request: {method} {path[:200]}")


async def no_such_endpoint(request: Request) -> Response:
    raise NotFound(f"no such endpoint {request.url.path[:200]}; the model is {MODEL_NAME!r}, under /v1/models/")


async def post(request: Request, name: str, version: str | None, label: str | None, verb: str) -> Response:
    serving, verb = serving_of(request), verb.lower()
    with serving.budget.claim(client_of(request)) as claim:
        if verb == "predict":
            return await serving.answered("predict", lambda: predict(request, name, version, label, claim))
        if verb == "classify-png":
            return await serving.answered("classify-png", lambda: classify_png(request, name, version, label, claim))
        raise BadRequest(
            f"{verb}: this model has one signature, {tfserving.SIGNATURE!r}, a predict signature; use :predict"
        )


async def predict(request: Request, name: str, version: str | None, label: str | None, claim: Claim) -> Response:
    serving = serving_of(request)
    number, label = tfserving.requested(name, version, label)
    serving.core.resolve(number, label)  # an unknown model, version or label is refused before its body is read
    body = await serving.body_of(request, MAX_JSON_BYTES, claim)
    parsed = await serving.parsers.run(parse_predict, body)
    answer = await serving.core.predict(parsed.images, number, label)
    key = "outputs" if parsed.columnar else "predictions"
    body = orjson.dumps({key: answer.probabilities}, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json", headers=served_headers(answer))


async def classify_png(request: Request, name: str, version: str | None, label: str | None, claim: Claim) -> Response:
    serving = serving_of(request)
    number, label = tfserving.requested(name, version, label)
    serving.core.resolve(number, label)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("send the PNG files as multipart/form-data (curl -F image=@shoe.png ...)")
    body = await serving.body_of(request, MAX_UPLOAD_BYTES, claim)
    named = await serving.parsers.run(parse_pngs, body, content_type, inline_bytes=0)
    pixels = SCALED[np.stack([image for _, image in named])]
    answer = await serving.core.predict(pixels, number, label)
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


async def get(
    serving: ServingState, name: str | None, version: str | None, label: str | None, metadata: str | None
) -> Response:
    if name is None:
        raise BadRequest("Missing model name in request.")
    number, label = tfserving.requested(name, version, label)
    if metadata:
        return await serving.answered("GetModelMetadata", lambda: metadata_of(serving, number, label))
    return await serving.answered("GetModelStatus", lambda: status_of(serving, number, label))


async def metadata_of(serving: ServingState, number: int | None, label: str | None) -> Response:
    served = serving.models.resolve(number, label)
    return JSONResponse(tfserving.rest_metadata(served), headers={"X-Model-Version": served.version})


async def status_of(serving: ServingState, number: int | None, label: str | None) -> Response:
    models = serving.models
    if number is None and label is None:
        served = models.served()
        status = tfserving.status_response(served, models.problems.get(STABLE))
        return JSONResponse(status, status_code=200 if served else 503)
    return JSONResponse(tfserving.status_response([models.resolve(number, label)]))
