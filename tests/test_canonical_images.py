"""Which canonical files a batch is screened against (fmnist/data/incoming.py: verified_canonical_images): the
ones a version recorded, else Fashion-MNIST's own, once a run has verified them into the raw folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fmnist.data.dataset import FASHION_MNIST
from fmnist.data.idx import encode_idx
from fmnist.data.incoming import verified_canonical_images
from fmnist.storage import Store
from tests.helpers import synthetic_images

SPEC = FASHION_MNIST


def write_raw(raw: Path) -> list[str]:
    """A raw folder with the canonical files' names, and the four sha256 a version records of them."""
    raw.mkdir()
    images = synthetic_images(np.arange(10, dtype=np.uint8), seed=1)
    contents = [encode_idx(images), b"train labels", encode_idx(images[:5]), b"test labels"]
    for file, content in zip(SPEC.files, contents, strict=True):
        (raw / file.raw_name).write_bytes(content)
    return [hashlib.sha256(content).hexdigest() for content in contents]


def test_the_files_a_version_recorded_are_read_by_their_position(tmp_path: Path) -> None:
    recorded = write_raw(tmp_path / "raw")
    known = verified_canonical_images(Store(scratch=tmp_path / "scratch"), str(tmp_path / "raw"), recorded)
    assert known is not None and known.identity == f"{recorded[2]}:{recorded[0]}"  # test images, train images
    assert len(known.test) == 5 and len(known.train) == 10  # read, and verified against the recorded sha256


def test_without_four_recorded_files_fashion_mnist_s_own_are_named(tmp_path: Path) -> None:
    recorded = write_raw(tmp_path / "raw")
    own = f"{SPEC.test_images.sha256}:{SPEC.train_images.sha256}"
    for partial in ([], recorded[:2]):
        known = verified_canonical_images(Store(scratch=tmp_path / "scratch"), str(tmp_path / "raw"), partial)
        assert known is not None and known.identity == own


def test_no_test_set_in_the_raw_folder_yet_is_none(tmp_path: Path) -> None:
    recorded = write_raw(tmp_path / "raw")
    (tmp_path / "raw" / SPEC.test_images.raw_name).unlink()
    assert verified_canonical_images(Store(scratch=tmp_path / "scratch"), str(tmp_path / "raw"), recorded) is None
