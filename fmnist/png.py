"""Reading Fashion-MNIST-style images from PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageFileError(ValueError):
    """An image file that cannot be used; the message names the file."""


def read_grayscale_png(path: Path) -> np.ndarray:
    """The image as a (rows, columns) uint8 array; it must be 8-bit grayscale."""
    try:
        with Image.open(path) as image:
            if image.mode != "L":
                raise ImageFileError(f"{path}: colour mode {image.mode}; expected 8-bit grayscale (L)")
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageFileError(f"{path}: not a readable PNG image ({exc})") from exc
