"""Images that appear twice: an incoming image equal to a test image leaks the test set into training.

Copies are found by exact content (a 16-byte BLAKE2b digest of each image's pixels): a test image
trained on inflates the next model's test accuracy, and then blocks every honest candidate at the
gate. Near-duplicates (a re-encoded or shifted copy) are not found; the drift check sees a batch
that is unlike the training data, not one that is too like the test data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import cached_property

import numpy as np


def image_digests(images: np.ndarray) -> list[bytes]:
    """One digest per image (row of `images`), of its pixels."""
    rows = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def index(images: np.ndarray) -> dict[bytes, int]:
    """Each image's digest and the row it is first found at."""
    found: dict[bytes, int] = {}
    for row, digest in enumerate(image_digests(images)):
        found.setdefault(digest, row)
    return found


def copies(images: np.ndarray, of: dict[bytes, int]) -> list[tuple[int, int]]:
    """(row in `images`, row in the indexed set) of each image that is also in the indexed set."""
    return [(row, of[digest]) for row, digest in enumerate(image_digests(images)) if digest in of]


class KnownImages:
    """The canonical images' digests, computed on first use: only runs with incoming batches need them."""

    def __init__(
        self, test_images: Callable[[], np.ndarray], train_images: Callable[[], np.ndarray], identity: str
    ) -> None:
        self._test_images = test_images
        self._train_images = train_images
        self.identity = identity  # what the two sets' content is (their files' hashes): screening depends on it

    @cached_property
    def test(self) -> dict[bytes, int]:
        return index(self._test_images())

    @cached_property
    def train(self) -> dict[bytes, int]:
        return index(self._train_images())
