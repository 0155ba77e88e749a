"""Feedback capture: a sample of what the server answers, kept for review and retraining
(`fashion-mnist review`). Off unless the operator turns it on (`serve --capture-rate` or
`--capture-below`).

What is kept, per image: the image as 8-bit pixels, the top class and its probability, the version
and label that answered, a record id, the request's id and the time. Images are chosen at the
capture rate, and always when the top probability is under the threshold. Records go to
`<data_root>/feedback/records/` in parquet files of up to RECORDS_PER_FILE, each written whole (a
temporary file renamed, or one PUT), off the request path: answering only appends to a bounded
queue; when the queue is full, or the folder holds MAX_RECORDS records or MAX_FILES files, records are
dropped and counted (`fashion_mnist_feedback_dropped_total{reason}`), never a request slowed or failed.

A partial file is written only when its oldest record has waited `flush_s` (CAPTURE_FLUSH_S unless
told), so a server that sees little traffic writes one file a minute, not one for every record: counted
in files alone, a trickle of requests would have filled the folder in hours and stopped capture for
good. Each file's name carries its record count, so the records already kept are counted at start
from a listing. Submitting a review deletes the files whose every record was reviewed
(`fmnist.ops.review`), which makes room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from fmnist.data.captured import RECORDS_PER_FILE, SCHEMA, encode, record_file_name, records_folder, records_in
from fmnist.serving.options import CAPTURE_FLUSH_S
from fmnist.storage import Store, join

MAX_QUEUED = 4096  # records waiting to be written; more are dropped
MAX_RECORDS = 2_000_000  # records in the feedback folder (about 1 KB each): then capture pauses
MAX_FILES = 20_000  # record files in the feedback folder: then capture pauses
STOP_WRITE_S = 10.0  # how long a stopping server waits for the queued records to be written

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureOptions:
    root: str  # <data_root>/feedback
    rate: float = 0.0  # share of images kept
    below: float = 0.0  # images whose top probability is under this are always kept
    flush_s: float = CAPTURE_FLUSH_S  # how long a record may wait for a file's worth before a partial file


class Capture:
    def __init__(self, store: Store, options: CaptureOptions, metrics) -> None:
        self.store = store
        self.options = options
        self.metrics = metrics
        self.folder = records_folder(options.root)
        self.queue: deque[tuple] = deque()
        self.wake = asyncio.Event()
        self.files = 0  # record files in the folder (counted at start, then as written)
        self.records = 0  # records in them
        self.writing = 0  # records taken from the queue and not yet written

    def offer(self, images: np.ndarray, probabilities: np.ndarray, version: str, label: str) -> None:
        """Queue the images to keep of one answered request (float32 in [0, 1]); never blocks."""
        confidence = probabilities.max(axis=1)
        keep = confidence < self.options.below
        if self.options.rate:
            keep |= np.random.random(len(images)) < self.options.rate
        chosen = np.flatnonzero(keep)
        if not len(chosen):
            return
        if self.full():
            self.metrics.feedback_dropped.labels("folder_full").inc(len(chosen))
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
        await self.count()
        try:
            while True:
                if self.full():  # a review may have made room: look again, once a cycle
                    await self.count()
                due_s = self.options.flush_s - (self.waited_s() if self.queue else 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(due_s, 0.01))
                self.wake.clear()
                while len(self.queue) >= RECORDS_PER_FILE:
                    await asyncio.to_thread(self.write, self.take())
                if self.queue and self.waited_s() >= self.options.flush_s:
                    await asyncio.to_thread(self.write, self.take())
        finally:
            await self.drain()

    async def drain(self) -> None:
        """Write what is queued as the server stops, for at most STOP_WRITE_S: a store that does not
        answer must not hold the stop (a supervisor would kill the server, and the records would go
        uncounted). What is not written by then is counted as dropped and logged."""
        written = threading.Event()

        def write_all() -> None:
            while self.queue:
                self.write(self.take())
            written.set()

        # A thread of its own, not the loop's executor: one that never returns must not hold the exit.
        threading.Thread(target=write_all, name="capture-drain", daemon=True).start()
        if await asyncio.to_thread(written.wait, STOP_WRITE_S):
            return
        left = len(self.queue) + self.writing
        self.metrics.feedback_dropped.labels("stopped").inc(left)
        log.warning(
            "%d feedback records not written: %s did not answer within %.0f s as the server stopped",
            left,
            self.folder,
            STOP_WRITE_S,
        )

    def full(self) -> bool:
        return self.files >= MAX_FILES or self.records >= MAX_RECORDS

    async def count(self) -> None:
        """The files and records in the folder, from its listing."""
        try:
            names = await asyncio.to_thread(self.store.listdir, self.folder)
        except Exception as exc:  # storage down: keep the last count, look again next cycle
            log.warning("could not list %s: %s", self.folder, exc)
            return
        self.files, self.records = len(names), sum(records_in(name) for name in names)

    def waited_s(self) -> float:
        """How long the oldest queued record has waited."""
        return (datetime.now(UTC) - datetime.fromisoformat(self.queue[0][1])).total_seconds()

    def take(self) -> list[tuple]:
        return [self.queue.popleft() for _ in range(min(RECORDS_PER_FILE, len(self.queue)))]

    def write(self, records: list[tuple]) -> None:
        if self.full():  # checked again here: records offered before the folder was counted
            self.metrics.feedback_dropped.labels("folder_full").inc(len(records))
            return
        columns = list(zip(*records, strict=True))
        data = {"id": [uuid.uuid4().hex for _ in records]}
        data.update(
            zip(["request", "at", "version", "label", "predicted", "confidence", "image"], columns, strict=True)
        )
        name = record_file_name(len(records))
        self.writing = len(records)
        try:
            self.store.write_bytes(join(self.folder, name), encode(pa.table(data, schema=SCHEMA)))
        except Exception as exc:  # storage down: these records are lost, serving goes on
            log.warning("could not write %d feedback records to %s: %s", len(records), self.folder, exc)
            self.metrics.feedback_dropped.labels("write_failed").inc(len(records))
            return
        finally:
            self.writing = 0
        self.files += 1
        self.records += len(records)
