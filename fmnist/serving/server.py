"""The prediction server: the registry's champion behind TF Serving's REST API (FastAPI on uvicorn).

    POST /v1/models/fashion-mnist:predict        {"instances": [image, ...]} -> {"predictions": [[p0..p9], ...]}
    GET  /v1/models/fashion-mnist                the version served and its state, as TF Serving reports it
    GET  /v1/models/fashion-mnist/metadata       its signature, and its registry record (metrics, preset, ...)
    POST /v1/models/fashion-mnist:classify-png   PNG uploads (multipart/form-data) -> class, index, probability
    GET  /healthz                                alive
    GET  /readyz                                 a verified model is loaded

An image is 28x28 nested lists or 784 numbers. The rule for its values is per image: if every value is
a JSON integer they are raw pixels, 0..255; if any has a decimal point or exponent they are floats in
[0, 1] (what `pixel / 255` gives). `{"inputs": [...]}` is answered with `{"outputs": [...]}`, and an
instance may name its input, `{"images": ...}`, as TF Serving allows. Each answer carries the registry
version that made it in the `X-Model-Version` header.

The server follows the champion: every `poll_s` it reads the pointer, and when it moved it loads the
new champion (its hash checked against the pointer's, in Keras' safe mode) beside the one in service
and only then switches; requests in flight finish on the old one, none fails. Concurrent requests are
joined into one model call: while one call runs, the requests that arrive queue up, and the next call
takes them all (up to `MAX_BATCH` images).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from fmnist.data.cache import normalize
from fmnist.data.dataset import CLASS_NAMES, IMAGE_SIZE
from fmnist.data.png import MAX_PNG_BYTES, ImageFileError, decode_grayscale_png, model_sized
from fmnist.registry.manifest import VersionManifest
from fmnist.registry.versions import Registry, version_number
from fmnist.training.export import INPUT, OUTPUT, SIGNATURE
from fmnist.training.model import load_verified_model

MODEL_NAME = "fashion-mnist"
MAX_INSTANCES = 1024  # per request
MAX_BATCH = 1024  # images per model call, across requests
MAX_FILES = 64  # PNG uploads per request
MAX_JSON_BYTES = 16 << 20  # 1,024 images as JSON floats take about 9 MB
MAX_UPLOAD_BYTES = MAX_FILES * (MAX_PNG_BYTES + 4096)
MAX_CONNECTIONS = 256  # requests and connections at once; more get a 503
PIXELS = IMAGE_SIZE * IMAGE_SIZE

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A request the server cannot answer; the message says what is wrong with it (HTTP 400)."""


class TooLarge(BadRequest):
    """A request body over the limit (HTTP 413)."""


class NotReady(RuntimeError):
    """No verified model is loaded yet (HTTP 503)."""


@dataclass(frozen=True)
class Served:
    """A loaded, verified champion."""

    version: str  # the registry's name, v0003
    model_sha256: str
    sequence: int | None  # of the champion change that put it in service
    predict: Callable[[np.ndarray], np.ndarray]  # float32 (n, 28, 28) in [0, 1] -> (n, 10) probabilities
    manifest: VersionManifest

    @property
    def number(self) -> str:
        """TF Serving's version: the registry's number (`fashion-mnist export` writes the same)."""
        return str(version_number(self.version))


def load_served(registry: Registry, record: dict) -> Served:
    """The champion of the pointer record `record`, loaded once its files verify, and warmed up."""
    import tensorflow as tf

    stored = registry.champion_model(record)
    model = load_verified_model(registry.store, stored)
    spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32)
    call = tf.function(lambda images: model(images, training=False), input_signature=[spec])

    def predict(images: np.ndarray) -> np.ndarray:
        return call(tf.constant(images)).numpy()

    predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.float32))  # traced before it serves
    return Served(
        record["version"], stored.sha256, record.get("sequence"), predict, registry.manifest(record["version"])
    )


class Champion:
    """The model in service, following the registry's champion pointer."""

    def __init__(self, registry: Registry, poll_s: float) -> None:
        self.registry = registry
        self.poll_s = poll_s
        self.current: Served | None = None
        self.problem = "loading the champion"  # why it is not ready, or why the last switch failed

    def refresh(self) -> None:
        """Switch to the champion the pointer names, if it changed and loads; otherwise keep serving."""
        try:
            record = self.registry.champion_record()
            if record is None:
                self.problem = f"no champion in {self.registry.root} yet"
                return
            current = self.current
            wanted = (record["version"], record.get("model_sha256"), record.get("sequence"))
            if current and (current.version, current.model_sha256, current.sequence) == wanted:
                return
            served = load_served(self.registry, record)
        except Exception as exc:  # a damaged pointer or model: keep serving what was verified
            self.problem = f"cannot load the champion: {exc}"
            log.warning("%s%s", self.problem, f"; still serving {self.current.version}" if self.current else "")
            return
        self.current = served  # one reference: each model call takes the model in service as it starts
        self.problem = ""
        log.info("Serving %s (model sha256 %s)", served.version, served.model_sha256[:12])

    async def follow(self) -> None:
        while True:
            await asyncio.to_thread(self.refresh)
            await asyncio.sleep(self.poll_s)

    def require(self) -> Served:
        if self.current is None:
            raise NotReady(f"no verified model loaded: {self.problem}")
        return self.current


class Batcher:
    """Joins concurrent requests' images into one model call, one call at a time."""

    def __init__(self, champion: Champion, max_batch: int = MAX_BATCH) -> None:
        self.champion = champion
        self.max_batch = max_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, Served]:
        self.champion.require()  # fail at once, not after queueing, when nothing is loaded
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def run(self) -> None:
        carried = None  # a request that did not fit into the last call: first in the next
        while True:
            batch = [carried or await self.queue.get()]
            carried, size = None, len(batch[0][0])
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if size + len(item[0]) > self.max_batch:
                    carried = item
                    break
                batch.append(item)
                size += len(item[0])
            waiting = [(images, future) for images, future in batch if not future.done()]  # the client left
            if not waiting:
                continue
            try:
                served = self.champion.require()
                joined = np.concatenate([images for images, _ in waiting])
                probabilities = await asyncio.to_thread(served.predict, joined)
            except Exception as exc:
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for images, future in waiting:
                if not future.done():
                    future.set_result((probabilities[start : start + len(images)], served))
                start += len(images)


def parse_instances(body: bytes) -> tuple[np.ndarray, str]:
    """The images of a TF Serving predict request as float32 (n, 28, 28) in [0, 1], and the answer's key."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not JSON ({exc})") from None
    if not isinstance(payload, dict) or not {"instances", "inputs"} & payload.keys():
        raise BadRequest('expected a JSON object with "instances": a list of 28x28 images (TF Serving\'s row format)')
    key = "instances" if "instances" in payload else "inputs"
    instances = payload[key]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(f'"{key}" must be a non-empty list of images')
    if len(instances) > MAX_INSTANCES:
        raise BadRequest(f"{len(instances):,} instances; at most {MAX_INSTANCES:,} in one request")
    images = []
    for number, instance in enumerate(instances):
        if isinstance(instance, dict) and instance.keys() == {INPUT}:
            instance = instance[INPUT]
        try:
            image = np.array(instance)
        except (ValueError, TypeError):
            raise BadRequest(f"instance {number}: rows of different lengths; expected 28x28 or 784 numbers") from None
        if image.dtype.kind not in "iuf":
            raise BadRequest(f"instance {number}: only numbers are pixels (integers 0..255, or floats in [0, 1])")
        if image.shape not in ((IMAGE_SIZE, IMAGE_SIZE), (PIXELS,)):
            shape = "x".join(map(str, image.shape)) or "a single number"
            raise BadRequest(f"instance {number}: expected 28x28 nested lists or 784 numbers; got {shape}")
        images.append(scaled(image.reshape(IMAGE_SIZE, IMAGE_SIZE), number))
    return np.stack(images), key


def scaled(image: np.ndarray, number: int) -> np.ndarray:
    """One instance's pixels as float32 in [0, 1]: integers are raw 0..255 values, floats already scaled."""
    if image.dtype.kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise BadRequest(f"instance {number}: integer pixels are raw 8-bit values, 0..255; got {low}..{high}")
        return normalize(image[None].astype(np.uint8)).reshape(image.shape)
    if not np.isfinite(image).all():
        raise BadRequest(f"instance {number}: pixels must be finite numbers; got NaN or infinity")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        raise BadRequest(
            f"instance {number}: float pixels must be in [0, 1] (pixel / 255); got {low:g}..{high:g}. "
            "Send integers for raw 0..255 pixels"
        )
    return image.astype(np.float32)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {int(declared):,} bytes; at most {limit:,} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over {limit:,} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)


async def uploaded_pngs(request: Request) -> list[tuple[str, np.ndarray]]:
    """The 28x28 grayscale PNGs of a multipart/form-data request, each with its file name."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("send the PNG files as multipart/form-data (curl -F image=@shoe.png ...)")
    body = await read_body(request, MAX_UPLOAD_BYTES)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # parsed from the body already read, so the size limit holds
        form = await Request(request.scope, replay).form(max_files=MAX_FILES, max_fields=MAX_FILES)
    except HTTPException as exc:
        raise BadRequest(f"not a readable multipart form ({exc.detail})") from None
    images = []
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            raise BadRequest(f"form field {field!r} is not a file; send each PNG as a file")
        name = value.filename or field
        images.append((name, model_sized(decode_grayscale_png(await value.read(), name), name)))
    if not images:
        raise BadRequest("no PNG file in the form")
    return images


def model_metadata(served: Served) -> dict:
    """TF Serving's metadata answer (the signature of the export, which this server's JSON mirrors) and,
    under `fashion_mnist`, what the registry knows of the version: how it did, on what, from what."""

    def tensor(name: str, dtype: str, dims: tuple[int, ...]) -> dict:
        shape = {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}
        return {"dtype": dtype, "tensor_shape": shape, "name": name}

    signature = {
        "inputs": {INPUT: tensor(f"{SIGNATURE}_{INPUT}:0", "DT_UINT8", (-1, IMAGE_SIZE, IMAGE_SIZE))},
        "outputs": {OUTPUT: tensor("StatefulPartitionedCall:0", "DT_FLOAT", (-1, len(CLASS_NAMES)))},
        "method_name": "tensorflow/serving/predict",
    }
    manifest = served.manifest
    return {
        "model_spec": {"name": MODEL_NAME, "signature_name": "", "version": served.number},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
        "fashion_mnist": {
            "version": served.version,
            "classes": list(CLASS_NAMES),
            "registered_at": manifest.registered_at,
            "metrics": manifest.metrics.model_dump(),
            "preset": manifest.params.preset,
            "gate": manifest.gate.reason,
            "model_sha256": served.model_sha256,
        },
    }


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)  # TF Serving's error body


def create_app(registry: Registry, poll_s: float = 2.0) -> FastAPI:
    champion = Champion(registry, poll_s)
    batcher = Batcher(champion)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        running = [asyncio.create_task(champion.follow()), asyncio.create_task(batcher.run())]
        yield
        for task in running:
            task.cancel()

    app = FastAPI(title="Fashion-MNIST champion", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.champion = champion

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(413 if isinstance(exc, TooLarge) else 400, str(exc))

    @app.exception_handler(ImageFileError)
    async def bad_image(request: Request, exc: ImageFileError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"no such endpoint {request.url.path}; the model is {MODEL_NAME!r}")
        return error(exc.status_code, str(exc.detail))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        served = champion.require()
        return JSONResponse({"status": "ready", "version": served.version, "model_sha256": served.model_sha256})

    @app.get(f"/v1/models/{MODEL_NAME}")
    async def model_status() -> JSONResponse:
        served = champion.current
        if served is None:
            status = {"version": "0", "state": "LOADING", "status": {"error_code": "UNAVAILABLE"}}
            status["status"]["error_message"] = champion.problem
            return JSONResponse({"model_version_status": [status]}, status_code=503)
        status = {"version": served.number, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        return JSONResponse({"model_version_status": [status]}, headers={"X-Model-Version": served.version})

    @app.get(f"/v1/models/{MODEL_NAME}/metadata")
    async def metadata() -> JSONResponse:
        served = champion.require()
        return JSONResponse(model_metadata(served), headers={"X-Model-Version": served.version})

    @app.post(f"/v1/models/{MODEL_NAME}:predict")
    async def predict(request: Request) -> JSONResponse:
        images, key = parse_instances(await read_body(request, MAX_JSON_BYTES))
        probabilities, served = await batcher.predict(images)
        answer = {"predictions" if key == "instances" else "outputs": probabilities.tolist()}
        return JSONResponse(answer, headers={"X-Model-Version": served.version})

    @app.post(f"/v1/models/{MODEL_NAME}:classify-png")
    async def classify_png(request: Request) -> JSONResponse:
        named = await uploaded_pngs(request)
        pixels = np.stack([image for _, image in named])
        probabilities, served = await batcher.predict(normalize(pixels).reshape(pixels.shape))
        results = []
        for (name, _), row in zip(named, probabilities, strict=True):
            best = int(row.argmax())
            results.append(
                {
                    "file": name,
                    "class": CLASS_NAMES[best],
                    "index": best,
                    "probability": float(row[best]),
                    "version": served.version,
                }
            )
        return JSONResponse({"results": results}, headers={"X-Model-Version": served.version})

    return app


def serve(
    registry: Registry,
    host: str,
    port: int,
    poll_s: float,
    *,
    max_connections: int = MAX_CONNECTIONS,
    access_log: bool = False,
) -> None:
    """Run the server until interrupted (one process: the model is loaded once)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("Serving the champion of %s on http://%s:%d (pointer read every %g s)", registry.root, host, port, poll_s)
    app = create_app(registry, poll_s)
    # Beyond `max_connections` open requests uvicorn answers 503 at once: memory stays bounded under overload.
    uvicorn.run(app, host=host, port=port, limit_concurrency=max_connections, access_log=access_log, log_level="info")
