"""Reading Fashion-MNIST-style images from PNG files, which may come from anyone.

Only a regular file of at most `MAX_PNG_BYTES` that starts with the PNG signature is decoded, and
only once its header says it has at most `MAX_PNG_PIXELS` pixels: a small file cannot make the
decoder allocate gigabytes. Every failure is an `ImageFileError` that names the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.storage.files import open_regular

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 1 << 20  # a 28x28 grayscale PNG takes under 1 KB; this leaves room for metadata
MAX_PNG_PIXELS = 256 * 256  # Fashion-MNIST images are 28x28
MAX_TEXT_BYTES = 64 << 10  # text chunks (tEXt, zTXt, iTXt) of one PNG, inflated


class ImageFileError(ValueError):
    """An image file that cannot be used; the message names the file."""


def _read_limited(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(MAX_PNG_BYTES + 1)
    except OSError as exc:
        raise ImageFileError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if max(size, len(data)) > MAX_PNG_BYTES:
        raise ImageFileError(f"{path}: {size:,} bytes, over the {MAX_PNG_BYTES:,}-byte limit for one image")
    return data


def read_grayscale_png(path: Path) -> np.ndarray:
    """The image as a (rows, columns) uint8 array; it must be an 8-bit grayscale PNG."""
    return decode_grayscale_png(_read_limited(path), str(path))


def model_sized(image: np.ndarray, path: str | Path) -> np.ndarray:
    """`image` if it is 28x28, the model's input; else an `ImageFileError` naming `path`."""
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ImageFileError(f"{path}: image is {image.shape[1]}x{image.shape[0]}; expected 28x28")
    return image


def decode_grayscale_png(data: bytes, path: str) -> np.ndarray:
    """The PNG image in `data` (named `path` in errors) as a (rows, columns) uint8 array."""
    if len(data) > MAX_PNG_BYTES:
        raise ImageFileError(f"{path}: {len(data):,} bytes, over the {MAX_PNG_BYTES:,}-byte limit for one image")
    if not data.startswith(PNG_SIGNATURE):
        raise ImageFileError(f"{path}: not a PNG image (it does not start with the PNG signature)")
    # Pillow inflates text chunks as it opens a file, up to 1 MB each and 64 MB in all: a 62 KB upload of
    # compressed text cost 0.4 s. This process reads only images, which need no text: a little is allowed.
    PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_BYTES, MAX_TEXT_BYTES
    try:
        # The pixel limit below is ours and lower; Pillow's warning about its own would only be noise.
        with warnings.catch_warnings(action="ignore", category=Image.DecompressionBombWarning):
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                width, height = image.size  # from the header: nothing is decoded yet
                if width * height > MAX_PNG_PIXELS:
                    raise ImageFileError(
                        f"{path}: image is {width}x{height}, over the {MAX_PNG_PIXELS:,}-pixel limit (expected 28x28)"
                    )
                image.verify()  # every chunk's CRC: a flipped bit in the pixel data is an error, not a wrong image
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:  # verify() leaves an image unusable
                if image.mode != "L":
                    raise ImageFileError(f"{path}: colour mode {image.mode}; expected 8-bit grayscale (L)")
                image.load()
                return np.asarray(image, dtype=np.uint8)
    except ImageFileError:
        raise
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageFileError(f"{path}: not a readable PNG image ({type(exc).__name__}: {exc})") from exc
