"""What REST and gRPC share: choosing the model a request asks for, the model call, and what is
counted of it (the metrics, and the shadow comparison of stable against the canary)."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

import numpy as np

from fmnist.registry.labels import STABLE
from fmnist.serving.capture import Capture
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import CANARY, Served, ServedModels

MAX_SHADOW_CALLS = 16  # shadow requests in flight at once; more are not sent (stable's clients never wait on them)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    served: Served
    label: str  # the label it was served as (or its version number, asked by number)
    probabilities: np.ndarray  # (n, 10)


class PredictionCore:
    def __init__(
        self, models: ServedModels, metrics: ServingMetrics, shadow_share: float = 0.0, capture: Capture | None = None
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.shadow_share = shadow_share
        self.capture = capture
        self.shadows: set[asyncio.Task] = set()

    async def predict(self, images: np.ndarray, version: int | None, label: str | None) -> Answer:
        served_as, served = self.models.choose(version, label, routed=True)
        probabilities = await served.batcher.predict(images)
        self.metrics.predictions(served_as, probabilities)
        if self.capture:
            self.capture.offer(images, probabilities, served.version, served_as)
        if served_as == STABLE and self.shadow_share and random.random() < self.shadow_share:
            self._shadow(images, probabilities)
        return Answer(served, served_as, probabilities)

    def _shadow(self, images: np.ndarray, stable: np.ndarray) -> None:
        canary = self.models.by_label.get(CANARY)
        if canary is None or len(self.shadows) >= MAX_SHADOW_CALLS:
            return

        async def compare() -> None:
            try:
                answer = await canary.batcher.predict(images)
            except Exception as exc:  # the canary's failure is counted, never stable's client's
                log.warning("shadow call to %s failed: %s", canary.version, exc)
                return
            agreed = int((answer.argmax(axis=1) == stable.argmax(axis=1)).sum())
            self.metrics.shadow.labels("yes").inc(agreed)
            self.metrics.shadow.labels("no").inc(len(stable) - agreed)

        task = asyncio.get_running_loop().create_task(compare())
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)
