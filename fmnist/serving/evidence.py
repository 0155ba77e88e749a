"""Live evidence: what this server saw of each version it served, counted as it answers and written beside
the registry one window at a time (the format and the reading side: `fmnist.evaluation.evidence`).

`EvidenceRecorder` counts, on the event loop and without I/O (a few numpy bincounts a request), per
version, the label it was served as and the way it met traffic (`served`; `shadow`, a copy of stable's
request sent to the canary, paired with stable's version). `EvidenceWriter` runs beside it: every
`window_s` it takes what was counted and creates one file per non-empty window, off the event loop.

What is counted, and where:
- A prediction request (TF Serving's predict and classify-png, KServe's infer, on REST and gRPC) is counted
  where its metrics are (`PredictionCore.counted`), under the version it was served by, or whose refusal
  it met: a REST request naming a label or version has it chosen before its body is read, so a body too
  large, too slow or malformed counts under that version (and a request naming neither under stable's).
  A request refused before any version was chosen (an unknown model, version or label; a gRPC message
  that does not parse, its model being inside it) says nothing of a version and is counted in the
  Prometheus metrics only. A model call that fails counts as `model_failed` (`MODEL_FAILED`), the one
  reason that is the version's own fault.
- Its images, classes and probabilities are counted once the model answered (`PredictionCore.predict`).
- A shadow call counts under the canary's version, label `canary`, source `shadow`, with stable's version
  as `paired_with` and the pairs of both answers' classes; a failed one as `model_failed`.

Each server start draws a new replica id (uuid4), and each window is created once (create-only), so a
restarted server neither rewrites nor double counts a window: a restart loses at most the window it had
not written. A write that fails (the store down) keeps the window for the next tick, at most
MAX_HELD_WINDOWS of them: beyond, the oldest is dropped, logged and counted
(`fashion_mnist_evidence_dropped_total{reason}`). Memory is bounded whatever the traffic: at most
MAX_KEYS accumulators of fixed size.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from fmnist.data.dataset import NUM_CLASSES
from fmnist.evaluation.evidence import (
    CONFIDENCE_BINS,
    LATENCY_BOUNDS_MS,
    MAX_ERROR_REASONS,
    MODEL_FAILED,
    PROBABILITY_BINS,
    EvidenceWindow,
    Source,
    latency_bin,
    window_location,
)
from fmnist.registry.labels import MAX_LABELS
from fmnist.serving.capture import STOP_WRITE_S
from fmnist.storage import PreconditionFailed, Store

# Accumulators a window may hold: each label served, and the canary's shadow, a few versions each (a label
# that moves within a window counts its old and its new version apart). Beyond, a window is dropped.
MAX_KEYS = 4 * (MAX_LABELS + 2)
MAX_HELD_WINDOWS = 32  # windows kept while the store fails: several ticks' worth; beyond, the oldest dropped
OTHER_REASON = "other"  # errors beyond MAX_ERROR_REASONS distinct reasons in a window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvidenceKey:
    version: str
    label: str
    source: Source
    paired_with: str | None = None  # a shadow window's stable version


@dataclass
class Attempt:
    """The version a prediction request reached (chosen, or refused by), noted as it is chosen."""

    version: str | None = None
    label: str | None = None


# The attempt of the request being answered: set where it is counted (`PredictionCore.counted`), noted
# where its version is chosen, deep in the handlers (a request's task carries its own value).
ATTEMPT: ContextVar[Attempt | None] = ContextVar("evidence_attempt", default=None)


def note_choice(label: str, version: str) -> None:
    """The request being answered is about `version`, served as `label` (the last choice stands)."""
    attempt = ATTEMPT.get()
    if attempt is not None:
        attempt.version, attempt.label = version, label


class Counts:
    """One key's counts over one window, as the fixed-size arrays an `EvidenceWindow` holds."""

    def __init__(self, paired: bool) -> None:
        self.requests = 0
        self.images = 0
        self.errors: dict[str, int] = {}
        self.latency = np.zeros(len(LATENCY_BOUNDS_MS) + 1, np.int64)
        self.predicted = np.zeros(NUM_CLASSES, np.int64)
        self.confidence = np.zeros(CONFIDENCE_BINS, np.int64)
        self.probabilities = np.zeros(NUM_CLASSES * PROBABILITY_BINS, np.int64)
        self.pairs = np.zeros(NUM_CLASSES * NUM_CLASSES, np.int64) if paired else None

    def request(self, reason: str | None, seconds: float) -> None:
        self.requests += 1
        if reason in (None, MODEL_FAILED):  # the version's latency: a refused request never reached its model
            self.latency[latency_bin(seconds * 1000)] += 1
        if reason is not None:
            if reason not in self.errors and len(self.errors) >= MAX_ERROR_REASONS:
                reason = OTHER_REASON
            self.errors[reason] = self.errors.get(reason, 0) + 1

    def answers(self, probabilities: np.ndarray) -> np.ndarray:
        """Count the images of one model answer, (n, 10) probabilities; their classes."""
        # A model's NaN counts as probability 0, not as a bin index that numpy cannot take.
        probabilities = np.nan_to_num(np.asarray(probabilities, np.float64), nan=0.0)
        classes = probabilities.argmax(axis=1)
        self.images += len(probabilities)
        self.predicted += np.bincount(classes, minlength=NUM_CLASSES)
        self.confidence += np.bincount(_bins(probabilities.max(axis=1), CONFIDENCE_BINS), minlength=CONFIDENCE_BINS)
        cells = np.arange(NUM_CLASSES) * PROBABILITY_BINS + _bins(probabilities, PROBABILITY_BINS)
        self.probabilities += np.bincount(cells.ravel(), minlength=NUM_CLASSES * PROBABILITY_BINS)
        return classes

    def paired(self, stable_classes: np.ndarray, classes: np.ndarray) -> None:
        self.pairs += np.bincount(stable_classes * NUM_CLASSES + classes, minlength=NUM_CLASSES * NUM_CLASSES)

    def window(self, replica: str, key: EvidenceKey, start: float, end: float) -> EvidenceWindow:
        pairs = None if self.pairs is None else self.pairs.reshape(NUM_CLASSES, NUM_CLASSES).tolist()
        return EvidenceWindow(
            replica=replica,
            version=key.version,
            label=key.label,
            source=key.source,
            start=start,
            end=end,
            requests=self.requests,
            images=self.images,
            errors=self.errors,
            latency_ms=self.latency.tolist(),
            predicted=self.predicted.tolist(),
            confidence=self.confidence.tolist(),
            probabilities=self.probabilities.reshape(NUM_CLASSES, PROBABILITY_BINS).tolist(),
            paired_with=key.paired_with,
            pairs=pairs,
        )


def _bins(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal bins over [0, 1]: 1.0 in the last, anything outside clipped to the ends."""
    return np.clip((values * bins).astype(np.int64), 0, bins - 1)


class EvidenceRecorder:
    """This replica's counts of the window in progress. Fed and swapped on the event loop only (no lock)."""

    def __init__(self, metrics=None, clock=time.time) -> None:
        self.replica = uuid.uuid4().hex  # per server start: a restart never writes an earlier run's window
        self.metrics = metrics  # ServingMetrics: windows dropped
        self.clock = clock
        self.start = clock()
        self.counts: dict[EvidenceKey, Counts] = {}
        self.uncounted = 0  # this window's requests and answers beyond MAX_KEYS keys

    def _counts(self, key: EvidenceKey) -> Counts | None:
        counts = self.counts.get(key)
        if counts is None:
            if len(self.counts) >= MAX_KEYS:
                self.uncounted += 1  # a window's worth dropped: said once, at the swap
                return None
            counts = self.counts[key] = Counts(paired=key.paired_with is not None)
        return counts

    def answered(self, attempt: Attempt | None, reason: str | None, seconds: float) -> None:
        """A prediction request answered (reason None) or refused, after `seconds`, under the version it reached."""
        if attempt is None or attempt.version is None:
            return
        if counts := self._counts(EvidenceKey(attempt.version, attempt.label, "served")):
            counts.request(reason, seconds)

    def served(self, version: str, label: str, probabilities: np.ndarray) -> None:
        """The images one model call of `version`, served as `label`, answered for a client."""
        if counts := self._counts(EvidenceKey(version, label, "served")):
            counts.answers(probabilities)

    def shadowed(
        self,
        version: str,
        stable: str,
        stable_probabilities: np.ndarray,
        probabilities: np.ndarray | None,
        seconds: float,
    ) -> None:
        """A shadow call to `version` (the canary) on stable's images: its answer, or None if it failed."""
        key = EvidenceKey(version, "canary", "shadow", paired_with=stable)
        if not (counts := self._counts(key)):
            return
        counts.request(MODEL_FAILED if probabilities is None else None, seconds)
        if probabilities is not None:
            classes = counts.answers(probabilities)
            counts.paired(np.asarray(stable_probabilities).argmax(axis=1), classes)

    def swap(self) -> list[EvidenceWindow]:
        """The windows counted since the last swap (the non-empty ones); counting starts a new window."""
        end = self.clock()
        counts, start, uncounted = self.counts, self.start, self.uncounted
        self.counts, self.start, self.uncounted = {}, end, 0
        if uncounted:
            if self.metrics is not None:
                self.metrics.evidence_dropped.labels("too_many_keys").inc()
            log.warning(
                "%d counts of the window from %.0f not kept: over %d versions and labels", uncounted, start, MAX_KEYS
            )
        windows, names = [], set()
        for key, counted in counts.items():
            if not (counted.requests or counted.images):
                continue
            window = counted.window(self.replica, key, start, max(end, start))
            # A shadow key paired with two stable versions in one window would share a file name: the
            # second starts a microsecond later (the name holds the start to the microsecond).
            while (window.version, window.file_name()) in names:
                window = window.model_copy(
                    update={"start": window.start + 1e-6, "end": max(window.end, window.start + 1e-6)}
                )
            names.add((window.version, window.file_name()))
            windows.append(window)
        return windows


class EvidenceWriter:
    """Writes the recorder's windows under `<registry root>/evidence/` every `window_s`, off the event loop."""

    def __init__(self, recorder: EvidenceRecorder, store: Store, registry_root: str, window_s: float, metrics) -> None:
        self.recorder, self.store, self.registry_root = recorder, store, registry_root
        self.window_s = window_s
        self.metrics = metrics  # ServingMetrics: evidence_dropped
        self.held: deque[EvidenceWindow] = deque()  # windows not written yet, oldest first
        self.writing = threading.Lock()  # one writer of `held` at a time (a tick's, or the stop's)

    async def run(self) -> None:
        """Write a window's files every `window_s` until cancelled; then the partial one (`drain`)."""
        try:
            while True:
                await asyncio.sleep(self.window_s)
                self.hold(self.recorder.swap())
                await asyncio.to_thread(self.write_held)
        finally:
            await self.drain()

    def hold(self, windows: list[EvidenceWindow]) -> None:
        self.held.extend(windows)
        while len(self.held) > MAX_HELD_WINDOWS:
            self.drop(self.held.popleft(), "write_failed", "the store failed for too long")

    def write_held(self) -> None:
        """Create each held window's file, oldest first; at the first failure keep the rest for the next tick."""
        with self.writing:
            while self.held:
                window = self.held[0]
                location = window_location(self.registry_root, window)
                try:
                    self.store.create(location, window.model_dump_json().encode())
                except PreconditionFailed:  # another window of this name: it cannot be written, ever
                    self.drop(self.held.popleft(), "conflict", f"{location} holds another window")
                    continue
                except Exception as exc:  # the store down: tried again at the next tick
                    log.warning("could not write evidence window %s (%d held): %s", location, len(self.held), exc)
                    return
                self.held.popleft()

    async def drain(self) -> None:
        """Write the partial window and what is held as the server stops, for at most STOP_WRITE_S (as
        capture does: a store that does not answer must not hold the stop); what is left is dropped."""
        self.hold(self.recorder.swap())
        written = threading.Event()

        def write_all() -> None:
            self.write_held()
            written.set()

        # A thread of its own, not the loop's executor: one that never returns must not hold the exit.
        threading.Thread(target=write_all, name="evidence-drain", daemon=True).start()
        finished = await asyncio.to_thread(written.wait, STOP_WRITE_S)
        why = (
            "the store failed as the server stopped"
            if finished
            else f"the store did not answer within {STOP_WRITE_S:g} s"
        )
        for window in list(self.held):
            self.drop(window, "stopped", why)

    def drop(self, window: EvidenceWindow, reason: str, why: str) -> None:
        """One line per window dropped (never per request), and the count."""
        if self.metrics is not None:
            self.metrics.evidence_dropped.labels(reason).inc()
        log.warning(
            "evidence window of %s (%s, %s, %d requests, from %.0f) dropped: %s",
            window.version,
            window.label,
            window.source,
            window.requests,
            window.start,
            why,
        )
