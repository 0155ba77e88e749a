"""TF Serving's request parsers as plain functions (no server, no TensorFlow): the JSON predict request's
forms and the pixels they give, the nesting bound checked before parsing, PNG uploads, and the paths and
versions TF Serving's REST API reads. The refusals as the server answers them: test_serving_rest."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fmnist.data.cache import SCALED
from fmnist.serving import tfserving
from fmnist.serving.errors import BadRequest, NotFound
from fmnist.serving.payloads import (
    MAX_BRACKETS,
    MAX_FILES,
    check_nesting,
    holds_boolean,
    parse_pngs,
    parse_predict,
    scaled_pixels,
)
from tests.helpers import synthetic_images

IMAGES = synthetic_images(np.array([1, 4], dtype=np.uint8), seed=31)
BOUNDARY = "b0undary"


def predict_body(payload: dict) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    ("payload", "columnar"),
    [
        ({"instances": IMAGES.tolist()}, False),
        ({"instances": [{"images": image} for image in IMAGES.tolist()]}, False),
        ({"instances": IMAGES.reshape(2, -1).tolist()}, False),
        ({"inputs": IMAGES.tolist()}, True),
        ({"inputs": {"images": IMAGES.tolist()}}, True),
        ({"signature_name": "", "inputs": IMAGES.tolist()}, True),
    ],
    ids=["rows", "rows, named", "rows of 784", "columns", "columns, named", "empty signature name"],
)
def test_every_form_of_a_predict_request_gives_the_same_scaled_images(payload: dict, columnar: bool) -> None:
    parsed = parse_predict(predict_body(payload))
    assert parsed.columnar is columnar
    assert parsed.images.dtype == np.float32 and parsed.images.shape == (2, 28, 28)
    np.testing.assert_array_equal(parsed.images, SCALED[IMAGES])  # training's very values of raw pixels


def test_float_pixels_are_taken_as_scaled_and_integers_as_raw_per_image() -> None:
    floats = (IMAGES[0] / 255).tolist()
    parsed = parse_predict(predict_body({"instances": [floats, IMAGES[1].tolist()]}))
    np.testing.assert_allclose(parsed.images[0], IMAGES[0] / 255, atol=1e-7)
    np.testing.assert_array_equal(parsed.images[1], SCALED[IMAGES[1]])


def test_the_nesting_bound_is_checked_before_parsing_at_its_exact_limit() -> None:
    check_nesting(b"[" * MAX_BRACKETS)
    with pytest.raises(BadRequest, match="nests more lists or objects"):
        check_nesting(b"[" * (MAX_BRACKETS + 1))


def test_booleans_among_numbers_are_found_though_numpy_makes_them_numbers() -> None:
    assert holds_boolean([[1, 2], [3, True]]) and not holds_boolean([[1, 2], [3, 4]])


def test_scaled_pixels_keep_floats_in_range_and_refuse_the_rest() -> None:
    floats = np.full((28, 28), 0.5, np.float64)
    assert scaled_pixels(floats, "x").dtype == np.float32
    with pytest.raises(BadRequest, match=r"x: float pixels must be in \[0, 1\]"):
        scaled_pixels(floats * 3, "x")
    with pytest.raises(BadRequest, match="x: pixels must be finite numbers"):
        scaled_pixels(np.full((28, 28), np.nan), "x")


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def multipart(files: list[tuple[str, str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for field, name, data in files
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def test_png_uploads_give_each_files_name_and_raw_pixels() -> None:
    body = multipart([("image", "a.png", png(IMAGES[0])), ("image", "b.png", png(IMAGES[1]))])
    named = parse_pngs(body, CONTENT_TYPE)
    assert [name for name, _ in named] == ["a.png", "b.png"]
    for (_, pixels), image in zip(named, IMAGES, strict=True):
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, image)


def test_more_png_files_than_the_limit_are_refused() -> None:
    body = multipart([("image", f"{n}.png", png(IMAGES[0])) for n in range(MAX_FILES + 1)])
    with pytest.raises(BadRequest, match=f"at most {MAX_FILES} PNG files a request"):
        parse_pngs(body, CONTENT_TYPE)


def test_a_form_without_a_boundary_is_refused() -> None:
    with pytest.raises(BadRequest, match="send the PNG files as multipart/form-data"):
        parse_pngs(b"", "multipart/form-data")


@pytest.mark.parametrize(
    ("path", "groups"),
    [
        ("/v1/models/fashion-mnist:predict", ("fashion-mnist", None, None, "predict")),
        ("/V1/MODELS/fashion-mnist/LABELS/canary:PREDICT", ("fashion-mnist", None, "canary", "PREDICT")),
        ("/v1/models/fashion-mnist/versions/2:classify-png", ("fashion-mnist", "2", None, "classify-png")),
        ("/v1/models/fashion-mnist/versions/x:predict", None),
        ("/v1/models/fashion-mnist/versions/1/labels/stable:predict", None),
    ],
)
def test_predict_paths_are_read_as_tf_serving_reads_them(path: str, groups: tuple | None) -> None:
    matched = tfserving.PREDICT_PATH.fullmatch(path)
    assert (matched.groups() if matched else None) == groups


@pytest.mark.parametrize(
    ("path", "groups"),
    [
        ("/v1/models", (None, None, None, None)),
        ("/v1/models/fashion-mnist/labels/canary/metadata", ("fashion-mnist", None, "canary", "metadata")),
        ("/v1/models/fashion-mnist/versions/3", ("fashion-mnist", "3", None, None)),
        ("/v1/models/fashion-mnist/debug", None),
    ],
)
def test_status_paths_are_read_as_tf_serving_reads_them(path: str, groups: tuple | None) -> None:
    matched = tfserving.STATUS_PATH.fullmatch(path)
    assert (matched.groups() if matched else None) == groups


def test_the_requested_version_or_label_is_checked_as_tf_serving_checks_it() -> None:
    assert tfserving.requested("fashion-mnist", None, "canary") == (None, "canary")
    assert tfserving.requested("fashion-mnist", "7", None) == (7, None)
    assert tfserving.requested("fashion-mnist", str(tfserving.MAX_VERSION), None)[0] == tfserving.MAX_VERSION
    with pytest.raises(NotFound, match=r"Servable not found for request: Latest\(other\)"):
        tfserving.requested("other", None, None)
    with pytest.raises(NotFound, match=r"Specific\(other, 3\)"):
        tfserving.requested("other", "3", None)
    for version in (str(tfserving.MAX_VERSION + 1), "9" * 5000):  # past int64; past what int() reads
        with pytest.raises(BadRequest, match="Failed to convert version"):
            tfserving.requested("fashion-mnist", version, None)
