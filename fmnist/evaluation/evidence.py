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

The reading side: `read_windows` (one version's windows in a time range; damaged files skipped and
named, never raised), `sum_windows` (their counts added up) and `prune_evidence` (old windows deleted).
"""

from __future__ import annotations

import math
import os
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fmnist.data.dataset import NUM_CLASSES
from fmnist.storage import NotAFile, Store, join
from fmnist.storage.files import printable

FORMAT = 1
MAX_WINDOW_S = 3600  # the longest window a server writes: a window ending in a range started at most this before
CONFIDENCE_BINS = 100  # top-class confidence: equal bins over [0, 1] (the ATC threshold needs them fine)
PROBABILITY_BINS = 20  # each class's probability: equal bins over [0, 1] (the drift tests' histograms)
# Upper bounds of the latency bins, in milliseconds; the last bin is everything above the last bound.
LATENCY_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MAX_IMAGES_PER_S = 100_000  # far beyond what one replica answers (a few thousand images a second on a GPU)
WINDOW_SLACK_S = 60  # a window's clock may run this much over its length (a slow write at the stop)
MAX_COUNT = 1 << 40  # any one count of a window: far beyond a window's traffic, far below int64's overflow
MAX_ERROR_REASONS = 32  # distinct error reasons kept per window; more are counted as "other"
REPLICA = re.compile(r"[0-9a-f]{32}")
REASON = re.compile(r"[a-z0-9_]{1,40}")
VERSION = re.compile(r"v\d{4,}")
# A window file's name, as `EvidenceWindow.file_name` writes it: its start, replica, label and source.
WINDOW_NAME = re.compile(r"(\d{10,}_\d{6})-([0-9a-f]{32})-([a-z0-9][a-z0-9_-]{0,31})-(served|shadow)\.json")
MAX_WINDOWS = 10_000  # window files read at once, the newest: a week of one replica's minute windows (about 50 MB)
MAX_WINDOW_BYTES = 64 << 10  # a window's JSON is about 3 KB; a bigger file is not one
MAX_SKIPPED_NAMED = 100  # files that are no windows named one by one in a read; the rest counted
READERS = 8  # window files read at once
MODEL_FAILED = "model_failed"  # the reason of a failed model call: the version's fault (the others are refusals)

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
        counts = [self.requests, self.images, *self.latency_ms, *self.predicted, *self.confidence]
        counts += [*self.errors.values(), *(c for row in self.probabilities for c in row)]
        counts += [c for row in self.pairs or [] for c in row if type(c) is int]
        if any(type(c) is not int or c < 0 for c in counts):
            raise ValueError("a count that is not a non-negative integer")
        if any(c > MAX_COUNT for c in counts):  # beyond any window's traffic; sums of such overflow numpy's int64
            raise ValueError(f"a count over {MAX_COUNT}")
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
        if any(sum(row) != self.images for row in self.probabilities):
            raise ValueError("a class's probability histogram does not add up to the images")
        if self.end - self.start > MAX_WINDOW_S + WINDOW_SLACK_S:
            raise ValueError(f"a window of {self.end - self.start:.0f} s; a server writes at most {MAX_WINDOW_S} s")
        most = (self.end - self.start + WINDOW_SLACK_S) * MAX_IMAGES_PER_S  # what one replica can have answered
        if max(self.requests, self.images) > most:
            raise ValueError(f"more than {MAX_IMAGES_PER_S} images a second: no replica answers that many")
        if self.errors.get(MODEL_FAILED, 0) > sum(self.latency_ms):
            raise ValueError("more failed model calls than model calls")
        refused = sum(count for reason, count in self.errors.items() if reason != MODEL_FAILED)
        if refused > self.requests or sum(self.latency_ms) != self.requests - refused:
            raise ValueError("the latency histogram does not hold the requests that reached a model call")
        if self.pairs is not None and (self.source != "shadow" or sum(map(sum, self.pairs)) != self.images):
            raise ValueError("pairs are a shadow window's, one for each image it answered")
        return self

    def file_name(self) -> str:
        stamp = f"{self.start:017.6f}".replace(".", "_")
        return f"{stamp}-{self.replica}-{self.label}-{self.source}.json"

    @classmethod
    def named(cls, name: str) -> tuple[float, str, str, str] | None:
        """The start, replica, label and source a window file's `name` claims; None for no window's name."""
        matched = WINDOW_NAME.fullmatch(name)
        if not matched:
            return None
        stamp, replica, label, source = matched.groups()
        return float(stamp.replace("_", ".")), replica, label, source


def evidence_root(registry_root: str) -> str:
    """Where the servers write their windows: `evidence/` beside the registry's versions."""
    return join(registry_root, "evidence")


def window_location(registry_root: str, window: EvidenceWindow) -> str:
    return join(evidence_root(registry_root), window.version, window.file_name())


@dataclass(frozen=True)
class WindowsRead:
    """What `read_windows` found: the valid windows (oldest first), and what it did not take."""

    windows: list[EvidenceWindow]
    skipped: list[str] = field(default_factory=list)  # "location: problem", each file that is not a valid window
    left_out: int = 0  # windows in range beyond MAX_WINDOWS, the oldest, not read


def read_windows(
    store: Store, registry_root: str, version: str, since: float, until: float | None = None
) -> WindowsRead:
    """The windows of `version` that start in [since, until) (until: None, no end), oldest first.

    The folder holds what any replica wrote, so every file is untrusted: one that is not a valid window
    (a name that is not a window's, too big, not JSON, wrong fields, content that does not match its name,
    or no file: a folder, or one pruned since the listing) is skipped and named in `skipped`. At most
    MAX_WINDOWS files are read, the newest; how many older ones were left is `left_out`. A store that
    cannot be listed or read raises (StorageError): no evidence is not the same as evidence unread."""
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise ValueError(f"{version!r} is not a registry version (v0001, ...)")
    if not math.isfinite(since) or (until is not None and not math.isfinite(until)):
        raise ValueError(f"the range [{since}, {until}) is not one of finite times")
    folder = join(evidence_root(registry_root), version)
    chosen, skipped = [], []
    for name in store.listdir(folder):
        claimed = EvidenceWindow.named(name)
        if claimed is None:  # printable: a name that is not UTF-8 goes on into logs, artifacts and events
            problem = "not a window's name (<start>-<replica>-<label>-<source>.json)"
            skipped.append(printable(f"{join(folder, name)}: {problem}"))
        elif since <= claimed[0] and (until is None or claimed[0] < until):
            chosen.append((claimed[0], name))
    chosen.sort()
    left_out = max(len(chosen) - MAX_WINDOWS, 0)
    names = [name for _, name in chosen[left_out:]]
    windows = []
    # Several reads at once: a remote bucket's small GETs wait on the network (tens of ms each), not the CPU.
    with ThreadPoolExecutor(READERS) as pool:
        for name, (window, problem) in zip(
            names, pool.map(lambda name: _read_window(store, join(folder, name), version, name), names), strict=True
        ):
            if window is None:
                skipped.append(printable(f"{join(folder, name)}: {problem}"))
            else:
                windows.append(window)
    if len(skipped) > MAX_SKIPPED_NAMED:
        skipped[MAX_SKIPPED_NAMED:] = [f"{folder}: {len(skipped) - MAX_SKIPPED_NAMED:,} more files that are no windows"]
    return WindowsRead(windows, skipped, left_out)


def _read_window(store: Store, location: str, version: str, name: str) -> tuple[EvidenceWindow | None, str]:
    try:
        if (data := store.read_at_most(location, MAX_WINDOW_BYTES)) is None:
            return None, f"over {MAX_WINDOW_BYTES:,} bytes: not a window"
    except FileNotFoundError as exc:  # pruned since the listing, or a folder with a window's name
        return None, f"not a file to read ({exc})"
    except NotAFile as exc:  # a FIFO, a device or a link to one: never read (it would block or never end)
        return None, f"not a regular file ({exc})"
    try:
        window = EvidenceWindow.model_validate_json(data)
    except ValidationError as exc:
        return None, f"not a valid window ({exc.error_count()} problems; first: {exc.errors()[0]['msg'][:200]})"
    if window.version != version or window.file_name() != name:
        return None, f"holds {window.version}'s window {window.file_name()}, not what its name says"
    return window, ""


@dataclass
class EvidenceTotals:
    """Windows' counts added up (`sum_windows`): what every replica saw of a version, over [start, end)."""

    windows: int = 0
    requests: int = 0
    images: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency_ms: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_MS) + 1))
    predicted: list[int] = field(default_factory=lambda: [0] * NUM_CLASSES)
    confidence: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)
    probabilities: list[list[int]] = field(default_factory=lambda: [[0] * PROBABILITY_BINS for _ in range(NUM_CLASSES)])
    pairs: dict[str, list[list[int]]] = field(default_factory=dict)  # by the stable version paired with
    start: float | None = None  # the first window's start
    end: float | None = None  # the last window's end
    replicas: set[str] = field(default_factory=set)

    @property
    def model_failures(self) -> int:
        """Requests whose model call failed (the version's fault; the other errors are refused requests)."""
        return self.errors.get(MODEL_FAILED, 0)


def sum_windows(windows: list[EvidenceWindow]) -> EvidenceTotals:
    """Every count of `windows` added up; the pairs per stable version they were paired with."""
    totals = EvidenceTotals()
    for window in windows:
        totals.windows += 1
        totals.requests += window.requests
        totals.images += window.images
        for reason, count in window.errors.items():
            totals.errors[reason] = totals.errors.get(reason, 0) + count
        _add(totals.latency_ms, window.latency_ms)
        _add(totals.predicted, window.predicted)
        _add(totals.confidence, window.confidence)
        for into, row in zip(totals.probabilities, window.probabilities, strict=True):
            _add(into, row)
        if window.pairs is not None:
            pairs = totals.pairs.setdefault(window.paired_with, [[0] * NUM_CLASSES for _ in range(NUM_CLASSES)])
            for into, row in zip(pairs, window.pairs, strict=True):
                _add(into, row)
        totals.start = window.start if totals.start is None else min(totals.start, window.start)
        totals.end = window.end if totals.end is None else max(totals.end, window.end)
        totals.replicas.add(window.replica)
    return totals


def _add(into: list[int], counts: list[int]) -> None:
    for index, count in enumerate(counts):
        into[index] += count


@dataclass(frozen=True)
class Pruned:
    """What `prune_evidence` did: the old windows it deleted, and what it left that is no window."""

    deleted: int
    left: list[str] = field(default_factory=list)  # "location: what it is", at most MAX_SKIPPED_NAMED


def prune_evidence(store: Store, registry_root: str, older_than_s: float, now: float | None = None) -> Pruned:
    """Delete the windows that started more than `older_than_s` ago. Only regular files named as windows, in
    folders named as versions, are deleted, and no link is followed (one could lead to a version's model or
    an operator's folder): anything else in `evidence/` is left there and named. Version folders stay (a
    server may be writing into one)."""
    if not (math.isfinite(older_than_s) and older_than_s > 0):
        raise ValueError(f"older_than_s must be a positive number of seconds, not {older_than_s!r}")
    cutoff = (time.time() if now is None else now) - older_than_s
    root, deleted, left = evidence_root(registry_root), 0, []
    for version in store.listdir(root):
        folder = join(root, version)
        if not VERSION.fullmatch(version) or not _is(store, folder, stat.S_ISDIR):
            left.append(printable(f"{folder}: not a version's folder of windows"))
            continue
        for name in store.listdir(folder):
            location = join(folder, name)
            claimed = EvidenceWindow.named(name)
            if claimed is None:
                left.append(printable(f"{location}: not a window's name"))
            elif claimed[0] < cutoff:  # checked only when old: in a bucket each check is a request
                if _is(store, location, stat.S_ISREG):
                    store.delete(location)
                    deleted += 1
                else:
                    left.append(f"{location}: not a regular file")
    if len(left) > MAX_SKIPPED_NAMED:
        left[MAX_SKIPPED_NAMED:] = [f"{root}: {len(left) - MAX_SKIPPED_NAMED:,} more entries that are no windows"]
    return Pruned(deleted, left)


def _is(store: Store, location: str, kind) -> bool:
    """Whether `location` is itself of `kind` (stat.S_ISDIR, stat.S_ISREG), not a link to one. A bucket has
    no links, FIFOs or devices: there a folder is a prefix, and a file anything that is not one."""
    path = store.direct_path(location)
    if path is None:
        return store.is_dir(location) == (kind is stat.S_ISDIR)
    try:
        return kind(os.lstat(path).st_mode)
    except FileNotFoundError:  # removed since the listing
        return False
