"""The models in service: the champion as `stable`, and each labeled version (`canary`, ...) beside it,
following the registry; and the batcher that joins concurrent requests into one model call.

Every `poll_s` the server reads the champion pointer and `labels.json`. A label that moved gets its new
version loaded (its model hashed against what the pointer or label recorded, in Keras' safe mode)
beside the one in service, and only then switched to; requests in flight finish on the old one, none
fails. A model that does not verify is never served: the label keeps what it had, and says why.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fmnist.data.dataset import IMAGE_SIZE
from fmnist.registry.labels import STABLE, Labels
from fmnist.registry.manifest import VersionManifest
from fmnist.registry.versions import Registry, version_number
from fmnist.serving.errors import BadRequest, NotFound, NotReady
from fmnist.training.model import load_verified_model

MODEL_NAME = "fashion-mnist"
CANARY = "canary"
MAX_BATCH = 1024  # images per model call, across requests

ModelCall = Callable[[np.ndarray], np.ndarray]  # float32 (n, 28, 28) in [0, 1] -> (n, 10)
# The model a champion or label record names, verified and loaded, and its sha256: `load_model` serves
# the Keras model; the serving tests pass one that needs no TensorFlow.
ModelLoader = Callable[[Registry, dict], tuple[ModelCall, str]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """A loaded, verified model."""

    version: str  # the registry's name, v0003
    model_sha256: str
    manifest: VersionManifest
    batcher: Batcher = field(compare=False)  # its model call: float32 (n, 28, 28) in [0, 1] -> (n, 10)

    @property
    def number(self) -> int:
        """TF Serving's version: the registry's number (`fashion-mnist export` writes the same)."""
        return version_number(self.version)


def load_model(registry: Registry, record: dict) -> tuple[ModelCall, str]:
    """The model a champion or label record names, loaded once its file verifies, traced and warmed up;
    and its sha256."""
    import tensorflow as tf

    stored = registry.champion_model(record)
    model = load_verified_model(registry.store, stored)
    spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.float32)
    call = tf.function(lambda images: model(images, training=False), input_signature=[spec])

    def predict(images: np.ndarray) -> np.ndarray:
        return call(tf.constant(images)).numpy()

    predict(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.float32))  # traced before it serves
    return predict, stored.sha256


def refreeze() -> None:
    """Keep the loaded models out of the garbage collector's walks. A full collection walked every object
    of the models served, stalling the event loop about 200 ms every 1.2 s at 64 clients (p99 215 ms);
    frozen, they are skipped. Unfrozen first, so that a retired model's cycles are collected."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ServedModels:
    """The versions in service by label, following the registry's champion pointer and labels."""

    def __init__(
        self,
        registry: Registry,
        poll_s: float,
        events=None,
        canary_share: float = 0.0,
        load: ModelLoader = load_model,
    ) -> None:
        self.registry = registry
        self.load = load
        self.labels = Labels(registry)
        self.poll_s = poll_s
        self.canary_share = canary_share
        self.events = events  # ServingMetrics, told of loads and switches
        self.by_label: dict[str, Served] = {}
        self.problems: dict[str, str] = {STABLE: "loading the champion"}  # why a label is not served as recorded

    def wanted(self) -> dict[str, dict]:
        """Each label's record in the registry now: `stable`, the champion's pointer, and the others.
        What cannot be read (a damaged pointer or labels file) keeps what it serves, and says why."""
        serving = {label: {"version": s.version, "model_sha256": s.model_sha256} for label, s in self.by_label.items()}
        try:
            wanted = dict(self.labels.records())
        except Exception as exc:
            log.warning("cannot read the labels (%s); the labeled versions keep serving", exc)
            wanted = {label: record for label, record in serving.items() if label != STABLE}
        try:
            champion = self.registry.champion_record()
        except Exception as exc:
            self._problem(STABLE, f"cannot read the champion pointer: {exc}")
            champion = serving.get(STABLE)
        if champion is None:
            self.problems[STABLE] = f"no champion in {self.registry.root} yet"
        else:
            wanted[STABLE] = champion
        return wanted

    def refresh(self) -> None:
        """Load what the registry's labels name now, where it changed and verifies; keep the rest serving."""
        wanted = self.wanted()
        loaded = {(s.version, s.model_sha256): s for s in self.by_label.values()}
        serving = dict(self.by_label)
        for label, record in wanted.items():
            key = (record["version"], record.get("model_sha256"))
            current = serving.get(label)
            if current and (current.version, current.model_sha256) == key:
                self.problems.pop(label, None)
                continue
            served = loaded.get(key)
            if served is None:
                try:
                    predict, sha256 = self.load(self.registry, record)
                    manifest = self.registry.manifest(record["version"])
                except Exception as exc:
                    self._problem(label, f"cannot load {record['version']}: {exc}")
                    self._event("model_loads", "refused")
                    continue
                batcher = Batcher(predict)
                batcher.on_call = self.events.model_call if self.events else None
                served = Served(record["version"], sha256, manifest, batcher)
                loaded[(served.version, served.model_sha256)] = served
                self._event("model_loads", "loaded")
            serving[label] = served
            self.problems.pop(label, None)
            self._event("switches", label)
            log.info("Serving %s as %r (model sha256 %s)", served.version, label, served.model_sha256[:12])
        for label in set(serving) - set(wanted) - {STABLE}:  # a cleared label; stable stays while the pointer heals
            log.info("Label %r removed: %s no longer served as it", label, serving.pop(label).version)
        self.by_label = serving  # one assignment: a request takes the models in service as it resolves
        if self.events:
            self.events.served_version.clear()
            for label, served in serving.items():
                self.events.served_version.labels(label).set(served.number)

    def _problem(self, label: str, problem: str) -> None:
        self.problems[label] = problem
        current = self.by_label.get(label)
        log.warning("%s%s", problem, f"; still serving {current.version} as {label!r}" if current else "")

    def _event(self, counter: str, value: str) -> None:
        if self.events:
            getattr(self.events, counter).labels(value).inc()

    async def follow(self) -> None:
        while True:
            before = self.served()
            await asyncio.to_thread(self.refresh)
            serving = {id(s) for s in self.by_label.values()}
            for served in before:
                if id(served) not in serving:
                    served.batcher.retire()  # it stops once the requests that chose it are answered
            if serving != {id(s) for s in before}:
                refreeze()
            await asyncio.sleep(self.poll_s)

    def served(self) -> list[Served]:
        """Each version in service once, in number order."""
        return sorted({s.version: s for s in self.by_label.values()}.values(), key=lambda s: s.number)

    def serves(self, number: int | None) -> bool:
        """Whether version `number` is served (None: any version)."""
        served = self.served()
        return bool(served) if number is None else any(s.number == number for s in served)

    def asked(self, number: int | None) -> list[Served]:
        """The versions a request naming `number` (or none) is about; NotFound for one not served."""
        return self.served() if number is None else [self.resolve(number)]

    def resolve(self, version: int | None = None, label: str | None = None) -> Served:
        return self.choose(version, label)[1]

    def choose(self, version: int | None, label: str | None, *, routed: bool = False) -> tuple[str, Served]:
        """The model a request asks for, and the label it is served as: a version number (served as
        the label that serves it), a label, or neither (the champion; with `routed`, the canary for a
        `canary_share` of such requests)."""
        serving = self.by_label
        if version is not None:
            for name, served in sorted(serving.items(), key=lambda item: item[0] != STABLE):
                if served.number == version:
                    return name, served
            raise NotFound(f"Servable not found for request: Specific({MODEL_NAME}, {version})")
        if label is None:
            if routed and self.canary_share and CANARY in serving and random.random() < self.canary_share:
                return CANARY, serving[CANARY]
            label = STABLE
        if label in serving:
            return label, serving[label]
        if label in self.problems:
            raise NotReady(f"no verified model loaded as {label!r}: {self.problems[label]}")
        raise BadRequest(f"Unrecognized servable version label: {label[:64]}")


class Batcher:
    """Joins one model's concurrent requests into one model call, one call at a time (in the event loop)."""

    def __init__(self, predict: ModelCall, max_batch: int = MAX_BATCH) -> None:
        self.model_call = predict
        self.max_batch = max_batch
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future] | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.retired = False  # no label serves it: the task ends when its queue is empty
        self.on_call: Callable[[int, float], None] | None = None  # (images, seconds) of each model call

    async def predict(self, images: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.task = loop.create_task(self.run())
        future = loop.create_future()
        await self.queue.put((images, future))
        return await future

    def retire(self) -> None:
        self.retired = True
        self.queue.put_nowait(None)  # wakes the task to see it

    async def run(self) -> None:
        carried = None  # a request that did not fit into the last call: first in the next
        loop = asyncio.get_running_loop()
        while True:
            if self.retired and carried is None and self.queue.empty():
                self.task = None
                return
            first = carried or await self.queue.get()
            if first is None:
                continue
            batch, carried, size = [first], None, len(first[0])
            while not self.queue.empty():
                item = self.queue.get_nowait()
                if item is None:
                    continue
                if size + len(item[0]) > self.max_batch:
                    carried = item
                    break
                batch.append(item)
                size += len(item[0])
            waiting = [(images, future) for images, future in batch if not future.done()]  # the client left
            if not waiting:
                continue
            started = loop.time()
            try:
                joined = np.concatenate([images for images, _ in waiting])
                probabilities = await asyncio.to_thread(self.model_call, joined)
            except Exception as exc:
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self.on_call:
                self.on_call(len(joined), loop.time() - started)
            start = 0
            for images, future in waiting:
                if not future.done():
                    future.set_result(probabilities[start : start + len(images)])
                start += len(images)
