"""Feedback capture: a sample of what the server answers, kept for review and retraining
(`fashion-mnist review`). Off unless the operator turns it on (`serve --capture-rate` or
`--capture-below`).

What is kept, per image: the image as 8-bit pixels, the top class and its probability, the version
and label that answered, a record id, the request's id and the time. Images are chosen at the
capture rate, and always when the top probability is under the threshold. Records go to
`<data_root>/feedback/records/` in parquet files of up to RECORDS_PER_FILE, each written whole (a
temporary file renamed, or one PUT), off the request path: answering only appends to a bounded
queue; when the queue is full, or the folder holds MAX_FILES files, records are dropped and counted
(`fashion_mnist_feedback_dropped_total{reason}`), never a request slowed or failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.storage import Store, join

MAX_QUEUED = 4096  # records waiting to be written; more are dropped
RECORDS_PER_FILE = 1024
FLUSH_S = 5.0  # a partial file is written after this long
MAX_FILES = 2000  # record files in the feedback folder (about 1 KB an image): then capture stops
RECORDS = "records"
PIXELS = IMAGE_SIZE * IMAGE_SIZE
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("request", pa.string()),
        ("at", pa.string()),
        ("version", pa.string()),
        ("label", pa.string()),
        ("predicted", pa.int8()),
        ("confidence", pa.float32()),
        ("image", pa.binary(PIXELS)),
    ]
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureOptions:
    root: str  # <data_root>/feedback
    rate: float = 0.0  # share of images kept
    below: float = 0.0  # images whose top probability is under this are always kept


def record_file(data: dict[str, list]) -> bytes:
    """One parquet file of records, in memory."""
    out = io.BytesIO()
    pq.write_table(pa.table(data, schema=SCHEMA), out, compression="zstd")
    return out.getvalue()


class Capture:
    def __init__(self, store: Store, options: CaptureOptions, metrics) -> None:
        self.store = store
        self.options = options
        self.metrics = metrics
        self.folder = join(options.root, RECORDS)
        self.queue: deque[tuple] = deque()
        self.wake = asyncio.Event()
        self.files = 0  # record files in the folder (counted at start, then as written)

    def offer(self, images: np.ndarray, probabilities: np.ndarray, version: str, label: str) -> None:
        """Queue the images to keep of one answered request (float32 in [0, 1]); never blocks."""
        confidence = probabilities.max(axis=1)
        keep = confidence < self.options.below
        if self.options.rate:
            keep |= np.random.random(len(images)) < self.options.rate
        chosen = np.flatnonzero(keep)
        if not len(chosen):
            return
        if self.files >= MAX_FILES:
            self.metrics.feedback_dropped.labels("files_full").inc(len(chosen))
            return
        room = MAX_QUEUED - len(self.queue)
        if len(chosen) > room:
            self.metrics.feedback_dropped.labels("queue_full").inc(len(chosen) - room)
            chosen = chosen[:room]
            if not len(chosen):
                return
        request, at = uuid.uuid4().hex, datetime.now(UTC).isoformat(timespec="milliseconds")
        pixels = np.rint(images[chosen] * 255).astype(np.uint8)
        best = probabilities[chosen].argmax(axis=1)
        for i, index in enumerate(chosen):
            self.queue.append(
                (request, at, version, label, int(best[i]), float(confidence[index]), pixels[i].tobytes())
            )
        self.metrics.feedback_captured.inc(len(chosen))
        if len(self.queue) >= RECORDS_PER_FILE:
            self.wake.set()

    async def run(self) -> None:
        """Write the queue out, a file at a time, until cancelled (then what is left)."""
        self.files = len(await asyncio.to_thread(self.store.listdir, self.folder))
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), FLUSH_S)
                self.wake.clear()
                while self.queue:
                    await asyncio.to_thread(self.write, self.take())
        finally:
            while self.queue:
                self.write(self.take())

    def take(self) -> list[tuple]:
        return [self.queue.popleft() for _ in range(min(RECORDS_PER_FILE, len(self.queue)))]

    def write(self, records: list[tuple]) -> None:
        columns = list(zip(*records, strict=True))
        data = {"id": [uuid.uuid4().hex for _ in records]}
        data.update(
            zip(["request", "at", "version", "label", "predicted", "confidence", "image"], columns, strict=True)
        )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        name = f"{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        try:
            self.store.write_bytes(join(self.folder, name), record_file(data))
        except Exception as exc:  # storage down: these records are lost, serving goes on
            log.warning("could not write %d feedback records to %s: %s", len(records), self.folder, exc)
            self.metrics.feedback_dropped.labels("write_failed").inc(len(records))
            return
        self.files += 1
