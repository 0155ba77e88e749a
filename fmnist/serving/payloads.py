"""Request bodies into images: TF Serving's JSON predict request, and PNG uploads. Plain functions with
no TensorFlow, so that the server can run them in worker processes (`BodyParsers`): a big body parsed
on the event loop, or on a thread (JSON parsing holds the GIL), would stall every other client.

The JSON request, as TF Serving reads it (its json_tensor.cc):

    {"signature_name": "serving_default",           optional; the only signature
     "instances": [image, {"images": image}, ...]}   row form: one image per instance, named or not
    {"inputs": [image, ...]} or {"inputs": {"images": [image, ...]}}   columnar form

An image is 28x28 nested lists or 784 numbers. The rule for its values is per image: if every value
is a JSON integer they are raw pixels, 0..255; if any has a decimal point or exponent they are floats
in [0, 1] (what `pixel / 255` gives). Booleans, null, strings and objects are not pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from fmnist.data.cache import SCALED
from fmnist.data.dataset import IMAGE_SIZE
from fmnist.data.png import MAX_PNG_BYTES, ImageFileError, decode_grayscale_png, model_sized
from fmnist.serving.errors import BadRequest
from fmnist.training.export import INPUT, SIGNATURE

MAX_INSTANCES = 1024  # per request
MAX_FILES = 64  # PNG uploads per request
PIXELS = IMAGE_SIZE * IMAGE_SIZE
# Brackets and braces a request of MAX_INSTANCES named 28x28 images needs, and some: a body with more
# (`[[],[],...]`) is refused before it is parsed, whatever its size.
MAX_BRACKETS = MAX_INSTANCES * (IMAGE_SIZE + 1) + 64
MAX_BRACES = MAX_INSTANCES + 64
INLINE_BYTES = 64 << 10  # bodies up to this size are parsed on the event loop (a one-image request: ~3 KB)


@dataclass(frozen=True)
class PredictRequest:
    images: np.ndarray  # float32 (n, 28, 28) in [0, 1]
    columnar: bool  # asked with "inputs": answered with "outputs"


def parse_predict(body: bytes) -> PredictRequest:
    """The images of a TF Serving JSON predict request; BadRequest naming the first problem."""
    if not body.strip():
        raise BadRequest("JSON Parse error: The document is empty")
    check_nesting(body)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if b"NaN" in body or b"Infinity" in body:
            raise BadRequest("pixels must be finite numbers; NaN and Infinity are not pixels") from None
        raise BadRequest(f"JSON Parse error: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the body is a JSON {_kind(payload)}; a predict request is an object")
    signature = payload.get("signature_name", SIGNATURE)
    if not isinstance(signature, str):
        raise BadRequest("'signature_name' key must be a string value.")
    if signature not in ("", SIGNATURE):
        raise BadRequest(f'Serving signature name: "{signature[:100]}" not found in signature def')
    if "instances" in payload and "inputs" in payload:
        raise BadRequest("Not formatted correctly: expecting only one of 'inputs' or 'instances' keys to exist")
    strict = may_hold_booleans(body)
    if "instances" in payload:
        return PredictRequest(_stack(_rows(payload["instances"]), "instance", strict), columnar=False)
    if "inputs" in payload:
        return PredictRequest(_stack(_columns(payload["inputs"]), "image", strict), columnar=True)
    raise BadRequest("Missing 'inputs' or 'instances' key")


def _rows(instances) -> list:
    if not isinstance(instances, list):
        raise BadRequest(f"'instances' must be a list of images; got a JSON {_kind(instances)}")
    if not instances:
        raise BadRequest("No values in 'instances' array")
    _count(len(instances))
    named = isinstance(instances[0], dict)
    images = []
    for number, instance in enumerate(instances):
        if isinstance(instance, dict) != named:
            got, expected = ("an object", "value/list") if not named else ("a list", "object")
            raise BadRequest(f"Expecting {expected} but got {got} at item {number} of input list")
        if named:
            if instance.keys() != {INPUT}:
                keys = ", ".join(sorted(instance)[:5]) or "none"
                raise BadRequest(f"instance {number}: keys must be equal to: {INPUT} (got {keys})")
            instance = instance[INPUT]
        images.append(instance)
    return images


def _columns(inputs) -> list:
    if isinstance(inputs, dict):
        if INPUT not in inputs:
            raise BadRequest(f"Missing named input: {INPUT} in 'inputs' object.")
        inputs = inputs[INPUT]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(image, list) for image in inputs):
        raise BadRequest("'inputs' must be a list of images (a batch: n x 28 x 28, or n x 784)")
    _count(len(inputs))
    return inputs


def _count(n: int) -> None:
    if n > MAX_INSTANCES:
        raise BadRequest(f"{n:,} instances; at most {MAX_INSTANCES:,} in one request")


def _stack(images: list, noun: str, strict: bool) -> np.ndarray:
    out = np.empty((len(images), IMAGE_SIZE, IMAGE_SIZE), np.float32)
    for number, values in enumerate(images):
        try:
            image = np.array(values)
        except (ValueError, TypeError):
            raise BadRequest(f"{noun} {number}: rows of different lengths; expected 28x28 or 784 numbers") from None
        if image.dtype.kind not in "iuf" or (strict and holds_boolean(values)):
            raise BadRequest(f"{noun} {number}: pixels must be numbers (integers 0..255, or floats in [0, 1])")
        if image.shape not in ((IMAGE_SIZE, IMAGE_SIZE), (PIXELS,)):
            shape = "x".join(map(str, image.shape)) or "a single number"
            raise BadRequest(f"{noun} {number}: expected 28x28 nested lists or 784 numbers; got {shape}")
        out[number] = _scaled(image.reshape(IMAGE_SIZE, IMAGE_SIZE), f"{noun} {number}")
    return out


def check_nesting(body: bytes) -> None:
    """Refuse, before parsing, a body with more lists or objects than MAX_INSTANCES images need."""
    if body.count(b"[") > MAX_BRACKETS or body.count(b"{") > MAX_BRACES:
        raise BadRequest(
            f"the body nests more lists or objects than {MAX_INSTANCES:,} images need; "
            f"send at most {MAX_INSTANCES:,} images of 28x28 numbers"
        )


def may_hold_booleans(body: bytes) -> bool:
    """Only a body with `true` or `false` in it can hide a boolean among numbers."""
    return b"true" in body or b"false" in body


def holds_boolean(values) -> bool:
    """Whether JSON values numpy made numbers held a boolean (numpy makes True a 1)."""
    return any(type(v) is bool for v in np.array(values, dtype=object).flat)


def _scaled(image: np.ndarray, what: str) -> np.ndarray:
    """One image's pixels as float32 in [0, 1]: integers are raw 0..255 values, floats already scaled."""
    if image.dtype.kind in "iu":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > 255:
            raise BadRequest(f"{what}: integer pixels are raw 8-bit values, 0..255; got {low}..{high}")
        image = image.astype(np.uint8)
    return scaled_pixels(image, what)


def scaled_pixels(pixels: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels (raw, 0..255) or floats (already scaled) as float32 in [0, 1], the very values
    training's normalize makes of raw pixels; floats outside [0, 1] are refused."""
    if pixels.dtype == np.uint8:
        return SCALED[pixels]
    if not np.isfinite(pixels).all():
        raise BadRequest(f"{what}: pixels must be finite numbers; got NaN or infinity")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 1:
        raise BadRequest(
            f"{what}: float pixels must be in [0, 1] (pixel / 255); got {low:g}..{high:g}. "
            "Send integers for raw 0..255 pixels"
        )
    return pixels.astype(np.float32)


def _kind(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def parse_pngs(body: bytes, content_type: str) -> list[tuple[str, np.ndarray]]:
    """The 28x28 grayscale PNGs of a multipart/form-data body, each with its file name, as uint8."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import FormParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise BadRequest("send the PNG files as multipart/form-data (curl -F image=@shoe.png ...)")
    parts: list[tuple[str, str | None, bytes | None]] = []

    def on_field(field) -> None:
        parts.append((_text(field.field_name), None, None))

    def on_file(file) -> None:
        file.file_object.seek(0)
        parts.append((_text(file.field_name), _text(file.file_name), file.file_object.read(MAX_PNG_BYTES + 1)))
        if len(parts) > MAX_FILES:
            raise BadRequest(f"over {MAX_FILES} parts in the form; at most {MAX_FILES} PNG files a request")

    # Files stay in memory: the body's size is bounded already, and a spill to disk would only add work.
    config = {"MAX_MEMORY_FILE_SIZE": len(body) + 1, "UPLOAD_KEEP_FILENAME": False}
    try:
        parser = FormParser(kind.decode(), on_field, on_file, boundary=options[b"boundary"], config=config)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise BadRequest(f"not a readable multipart form ({exc})") from None
    images = []
    for field, filename, data in parts:
        if data is None:
            raise BadRequest(f"form field {field!r} is not a file; send each PNG as a file")
        name = filename or field
        try:
            images.append((name, model_sized(decode_grayscale_png(data, name), name)))
        except ImageFileError as exc:
            raise BadRequest(str(exc)) from None
    if not images:
        raise BadRequest("no PNG file in the form")
    return images


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")[:200]
    return (value or "")[:200]


MAX_UPLOAD_BYTES = MAX_FILES * (MAX_PNG_BYTES + 4096)
