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

DIGEST_SIZE = 16


def image_digests(images: np.ndarray) -> list[bytes]:
    """One digest per image (row of `images`), of its pixels."""
    rows = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=DIGEST_SIZE).digest() for row in rows]


def digest_array(digests: list[bytes]) -> np.ndarray:
    """`image_digests` as one (n, 16) uint8 array: 16 bytes an image, to keep and compare in bulk."""
    return np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), DIGEST_SIZE)


def shared_images(sets: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each set of image digests (`digest_array`s, one per batch): its rows whose image is also in
    another set, in row order, and for each such row an id that all copies of that image share.

    One sort of all the digests: time O(n log n) and 16 bytes an image for n images in all; only images
    in more than one set reach Python.
    """
    sizes = [len(s) for s in sets]
    empty = np.empty(0, np.int64)
    if not sum(sizes):
        return [(empty, empty) for _ in sets]
    keys = np.ascontiguousarray(np.concatenate(sets)).view("<u8").reshape(-1, 2)
    owner = np.repeat(np.arange(len(sets)), sizes)
    order = np.lexsort((owner, keys[:, 1], keys[:, 0]))  # by image, then by set
    ordered = keys[order]
    starts = np.concatenate(([True], np.any(ordered[1:] != ordered[:-1], axis=1)))
    image = np.cumsum(starts) - 1  # an id per distinct image, at each sorted position
    first, last = np.flatnonzero(starts), np.append(np.flatnonzero(starts)[1:], len(order)) - 1
    owners = owner[order]
    spans_sets = owners[first] != owners[last]  # per image id: in more than one set
    at = np.flatnonzero(spans_sets[image])  # sorted positions of the shared images' copies
    sets_of, ids = owners[at], image[at]
    rows = order[at] - np.concatenate(([0], np.cumsum(sizes)))[sets_of]
    by_set = np.lexsort((rows, sets_of))
    sets_of, rows, ids = sets_of[by_set], rows[by_set], ids[by_set]
    bounds = np.searchsorted(sets_of, np.arange(len(sets) + 1))
    return [(rows[bounds[n] : bounds[n + 1]], ids[bounds[n] : bounds[n + 1]]) for n in range(len(sets))]


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
