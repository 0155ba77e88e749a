"""Feedback as the server writes it, and what a review would offer, for the loop's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fmnist.data.captured import lowest_confidence
from fmnist.ops.review import reserved
from fmnist.serving.capture import Capture, CaptureOptions
from fmnist.serving.metrics import ServingMetrics
from fmnist.storage import Store
from tests.helpers import synthetic_images


def captured(store: Store, feedback: str, images: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> None:
    """Records as the server writes them (through Capture's own writer)."""
    keeper = Capture(store, CaptureOptions(feedback, rate=1.0), ServingMetrics("fashion-mnist"))
    probabilities = np.full((len(images), 10), 0.0, np.float32)
    probabilities[np.arange(len(images)), predicted] = confidence
    keeper.offer(images.astype(np.float32) / 255, probabilities, "v0001", "stable")
    keeper.write(keeper.take())


def waiting(store: Store, feedback: str) -> int:
    """The records a review would offer: neither reviewed nor in an open offer."""
    return lowest_confidence(store, feedback, reserved(store, feedback), 1)[1]


def new_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_images(np.array([5]), seed=34)[0]).save(path)
