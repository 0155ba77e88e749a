"""Live evidence: what a server saw of each version it served, one window of time at a time.

Each server (replica) counts, per version and per way it met traffic (`served`: it answered clients;
`shadow`: it was sent a copy of stable's requests), the requests, errors by reason, latency, the
predicted classes, the top-class confidence and each class's probability, all as fixed-size
histograms. A canary's shadow window also holds the pairs: stable's class (row) against the canary's
(column) for the same images. Every `window_s` the server writes what it counted as one file, created
once and never rewritten, under the registry:

    evidence/<version>/<start>-<replica>-<label>-<source>.json

so the judge and the monitor read evidence without Prometheus or any particular server, several
replicas' windows add up, and a restarted server (a new replica id) never writes a window twice.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fmnist.data.dataset import NUM_CLASSES

FORMAT = 1
CONFIDENCE_BINS = 100  # top-class confidence: equal bins over [0, 1] (the ATC threshold needs them fine)
PROBABILITY_BINS = 20  # each class's probability: equal bins over [0, 1] (the drift tests' histograms)
# Upper bounds of the latency bins, in milliseconds; the last bin is everything above the last bound.
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MAX_ERROR_REASONS = 32  # distinct error reasons kept per window; more are counted as "other"
REPLICA = re.compile(r"[0-9a-f]{32}")
REASON = re.compile(r"[a-z0-9_]{1,40}")

Source = Literal["served", "shadow"]


def confidence_bin(confidence: float) -> int:
    return min(int(confidence * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)


def latency_bin(latency_ms: float) -> int:
    for index, bound in enumerate(LATENCY_BOUNDS_MS):
        if latency_ms <= bound:
            return index
    return len(LATENCY_BOUNDS_MS)


def _counts(length: int) -> Field:
    return Field(default_factory=lambda: [0] * length, min_length=length, max_length=length)


class EvidenceWindow(BaseModel):
    """One replica's counts of one version, served as one label, met one way, over [start, end)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal[1] = FORMAT
    replica: str = Field(pattern=REPLICA.pattern)
    version: str = Field(pattern=r"^v\d{4,}$")
    label: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")  # stable, canary, ... or the number it was asked by
    source: Source
    start: float = Field(ge=0)  # seconds since the epoch
    end: float = Field(ge=0)
    requests: int = Field(0, ge=0)
    images: int = Field(0, ge=0)
    errors: dict[str, int] = Field(default_factory=dict, max_length=MAX_ERROR_REASONS + 1)
    latency_ms: list[int] = _counts(len(LATENCY_BOUNDS_MS) + 1)
    predicted: list[int] = _counts(NUM_CLASSES)
    confidence: list[int] = _counts(CONFIDENCE_BINS)
    probabilities: list[list[int]] = Field(
        default_factory=lambda: [[0] * PROBABILITY_BINS for _ in range(NUM_CLASSES)],
        min_length=NUM_CLASSES,
        max_length=NUM_CLASSES,
    )
    paired_with: str | None = Field(None, pattern=r"^v\d{4,}$")  # a shadow window's stable version
    pairs: list[list[int]] | None = None  # NUM_CLASSES x NUM_CLASSES: stable's class x this version's

    @model_validator(mode="after")
    def _consistent(self) -> EvidenceWindow:
        if not (math.isfinite(self.start) and self.start <= self.end):
            raise ValueError(f"the window ends ({self.end}) before it starts ({self.start})")
        counts = [*self.latency_ms, *self.predicted, *self.confidence, *self.errors.values()]
        counts += [c for row in self.probabilities for c in row]
        if any(type(c) is not int or c < 0 for c in counts):
            raise ValueError("a count that is not a non-negative integer")
        if any(len(row) != PROBABILITY_BINS for row in self.probabilities):
            raise ValueError(f"each class's probability histogram has {PROBABILITY_BINS} bins")
        if any(not REASON.fullmatch(reason) for reason in self.errors):
            raise ValueError("an error reason that is not a short lower-case name")
        if (self.pairs is None) != (self.paired_with is None):
            raise ValueError("pairs and paired_with go together")
        if self.pairs is not None:
            if len(self.pairs) != NUM_CLASSES or any(len(row) != NUM_CLASSES for row in self.pairs):
                raise ValueError(f"pairs are {NUM_CLASSES} x {NUM_CLASSES}")
            if any(type(c) is not int or c < 0 for row in self.pairs for c in row):
                raise ValueError("a pair count that is not a non-negative integer")
        if sum(self.predicted) != self.images or sum(self.confidence) != self.images:
            raise ValueError("the class and confidence counts do not add up to the images")
        return self

    def file_name(self) -> str:
        stamp = f"{self.start:017.6f}".replace(".", "_")
        return f"{stamp}-{self.replica}-{self.label}-{self.source}.json"
