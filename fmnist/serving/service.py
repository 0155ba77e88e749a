"""What REST and gRPC share: choosing the model a request asks for, the model call, and what is
counted of it (the metrics, the live evidence, and the shadow comparison of stable against the canary)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fmnist.registry.labels import STABLE
from fmnist.serving.capture import Capture
from fmnist.serving.errors import ModelFailed, ServingError
from fmnist.serving.evidence import ATTEMPT, Attempt, EvidenceRecorder, note_choice
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import CANARY, Served, ServedModels

MAX_SHADOW_CALLS = 16  # shadow requests in flight at once; more are not sent (stable's clients never wait on them)
SHADOW_STOP_S = 5.0  # how long a stopping server waits for the shadow calls in flight (their answers are evidence)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    served: Served
    label: str  # the label it was served as (or its version number, asked by number)
    probabilities: np.ndarray  # (n, 10)


class PredictionCore:
    def __init__(
        self,
        models: ServedModels,
        metrics: ServingMetrics,
        shadow_share: float = 0.0,
        capture: Capture | None = None,
        evidence: EvidenceRecorder | None = None,
    ) -> None:
        self.models = models
        self.metrics = metrics
        self.shadow_share = shadow_share
        self.capture = capture
        self.evidence = evidence
        self.shadows: set[asyncio.Task] = set()

    async def counted(self, api: str, entrypoint: str, answer: Callable[[], Awaitable[T]]) -> T:
        """`answer()`, counted by its canonical code in TF Serving's request metrics and, where it reached a
        version (a prediction), in that version's evidence: one seam, so the two never disagree. A request
        that ends otherwise (its client gone: cancelled) is in neither."""
        started, attempt = time.perf_counter(), Attempt()
        token = ATTEMPT.set(attempt)
        try:
            result = await answer()
        except ServingError as exc:
            self._count(exc.code, exc.reason, api, entrypoint, time.perf_counter() - started, attempt)
            raise
        finally:
            ATTEMPT.reset(token)
        self._count("OK", None, api, entrypoint, time.perf_counter() - started, attempt)
        return result

    def _count(self, code: str, reason: str | None, api: str, door: str, seconds: float, attempt: Attempt) -> None:
        self.metrics.answered(code, api, door, seconds)
        if self.evidence:
            self.evidence.answered(attempt, reason, seconds)

    def resolve(self, version: int | None, label: str | None) -> Served:
        """The model a request asks for, chosen before its body is read (an unknown one refused unread), and
        noted as the version its refusals count under."""
        served_as, served = self.models.choose(version, label)
        note_choice(served_as, served.version)
        return served

    async def predict(self, images: np.ndarray, version: int | None, label: str | None) -> Answer:
        served_as, served = self.models.choose(version, label, routed=True)
        note_choice(served_as, served.version)
        try:
            probabilities = await served.batcher.predict(images)
        except Exception as exc:
            raise ModelFailed(f"{served.version} failed to answer: {str(exc)[:200]}") from exc
        self.metrics.predictions(served_as, probabilities)
        if self.evidence:
            self.evidence.served(served.version, served_as, probabilities)
        if self.capture:
            self.capture.offer(images, probabilities, served.version, served_as)
        if served_as == STABLE and self.shadow_share and random.random() < self.shadow_share:
            self._shadow(images, served.version, probabilities)
        return Answer(served, served_as, probabilities)

    def _shadow(self, images: np.ndarray, stable_version: str, stable: np.ndarray) -> None:
        canary = self.models.by_label.get(CANARY)
        if canary is None or len(self.shadows) >= MAX_SHADOW_CALLS:
            return

        async def compare() -> None:
            started = time.perf_counter()
            try:
                answer = await canary.batcher.predict(images)
            except Exception as exc:  # the canary's failure is counted, never stable's client's
                log.warning("shadow call to %s failed: %s", canary.version, exc)
                if self.evidence:
                    self.evidence.shadowed(canary.version, stable_version, stable, None, time.perf_counter() - started)
                return
            if self.evidence:
                self.evidence.shadowed(canary.version, stable_version, stable, answer, time.perf_counter() - started)
            agreed = int((answer.argmax(axis=1) == stable.argmax(axis=1)).sum())
            self.metrics.shadow.labels("yes").inc(agreed)
            self.metrics.shadow.labels("no").inc(len(stable) - agreed)

        task = asyncio.get_running_loop().create_task(compare())
        self.shadows.add(task)
        task.add_done_callback(self.shadows.discard)

    async def finish_shadows(self, timeout_s: float = SHADOW_STOP_S) -> None:
        """As the server stops: the shadow calls in flight finished, so that the evidence's last window holds
        their answers (stable's side of each pair is counted already); those still running after `timeout_s`
        are cancelled, and counted in one line, never left to vanish with the event loop."""
        if not self.shadows:
            return
        _, unfinished = await asyncio.wait(set(self.shadows), timeout=timeout_s)
        for task in unfinished:
            task.cancel()
        if unfinished:
            log.warning(
                "%d shadow calls still running %g s into the stop were dropped: the canary's evidence lacks them",
                len(unfinished),
                timeout_s,
            )
