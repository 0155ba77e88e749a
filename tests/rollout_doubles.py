"""Synthetic models whose true behaviour is known, their live evidence as servers would count it, and
versions registered with what the rollout judge reads (no training): for the judge's, the monitor's and the
end-to-end rollout tests."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime

import numpy as np

from fmnist.data.dataset import CLASS_SLUGS, NUM_CLASSES
from fmnist.data.feedback import ReviewedBatch, ledger_location
from fmnist.evaluation.estimates import Calibration, confidence_counts, fit_calibration, probability_counts
from fmnist.evaluation.evaluate import Evaluation
from fmnist.evaluation.evidence import LATENCY_BOUNDS_MS, MODEL_FAILED, EvidenceTotals, EvidenceWindow, window_location
from fmnist.registry.judge import JudgeParams, LiveEvidence, Offline
from fmnist.registry.registration import register_model
from fmnist.registry.versions import Registry
from fmnist.storage import StoredFile, join
from fmnist.storage.layout import RunLayout
from fmnist.training.fit import TrainResult
from tests.helpers import GATE, run_manifest
from tests.test_registry import run_files

HELD_OUT = 10_000
RULE = JudgeParams(min_samples=2000, max_duration_s=3600)
FIVE_MS = LATENCY_BOUNDS_MS.index(5)
SWAPPED = (0, 6)  # T-shirt/top and Shirt, the pair a model confuses most


def answers(labels: np.ndarray, seed: int, accuracy: float = 0.9, swap_rate: float = 0.0) -> np.ndarray:
    """A model's probabilities on images of true classes `labels`: right with `accuracy` (confident), else a
    random other class (less so); with `swap_rate`, that share of the SWAPPED classes' images confidently
    called the other one of the pair (a model trained on partly swapped labels)."""
    rng = np.random.default_rng(seed)
    predicted = labels.copy()
    wrong = rng.random(len(labels)) > accuracy
    predicted[wrong] = (labels[wrong] + rng.integers(1, NUM_CLASSES, wrong.sum())) % NUM_CLASSES
    a, b = SWAPPED
    swapped = np.isin(labels, SWAPPED) & (rng.random(len(labels)) < swap_rate)
    predicted[swapped] = np.where(labels[swapped] == a, b, a)
    right = predicted == labels
    top = np.where(right | swapped, rng.uniform(0.75, 1.0, len(labels)), rng.uniform(0.35, 0.7, len(labels)))
    probabilities = np.repeat(((1 - top) / (NUM_CLASSES - 1))[:, None], NUM_CLASSES, axis=1)
    probabilities[np.arange(len(labels)), predicted] = top
    return probabilities.astype(np.float32)


def totals(probabilities: np.ndarray, failures: int = 0, latency_bin: int = FIVE_MS) -> EvidenceTotals:
    """What servers' windows add up to for these answers, one image a request."""
    latency = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    latency[latency_bin] = len(probabilities) + failures
    return EvidenceTotals(
        windows=1,
        requests=len(probabilities) + failures,
        images=len(probabilities),
        errors={MODEL_FAILED: failures} if failures else {},
        latency_ms=latency,
        predicted=np.bincount(probabilities.argmax(axis=1), minlength=NUM_CLASSES).tolist(),
        confidence=confidence_counts(probabilities).tolist(),
        probabilities=probability_counts(probabilities).tolist(),
    )


def pairs_of(stable: np.ndarray, canary: np.ndarray) -> np.ndarray:
    index = stable.argmax(axis=1) * NUM_CLASSES + canary.argmax(axis=1)
    return np.bincount(index, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


class Versions:
    """A champion and a canary as registration keeps them: calibrations and test predictions."""

    def __init__(self, canary_swap_rate: float = 0.0, canary_accuracy: float = 0.9) -> None:
        labels = np.arange(HELD_OUT) % NUM_CLASSES
        self.stable_held_out = answers(labels, seed=1)
        self.canary_held_out = answers(labels, seed=2, accuracy=canary_accuracy, swap_rate=canary_swap_rate)
        self.canary_swap_rate, self.canary_accuracy = canary_swap_rate, canary_accuracy
        self.offline = Offline(
            fit_calibration(self.canary_held_out, labels),
            fit_calibration(self.stable_held_out, labels),
            self.canary_held_out.argmax(axis=1).astype(np.uint8),
            self.stable_held_out.argmax(axis=1).astype(np.uint8),
        )

    def live(self, labels: np.ndarray, elapsed_s: float = 600, canary_broken: float = 0.0, failures: int = 0):
        """Stable served `labels`' images and shadowed each to the canary (which, `canary_broken` of the time,
        answers at random: a preprocessing fault only live images meet)."""
        stable = answers(labels, seed=11)
        canary = answers(labels, seed=12, accuracy=self.canary_accuracy, swap_rate=self.canary_swap_rate)
        broken = np.random.default_rng(13).random(len(labels)) < canary_broken
        canary[broken] = np.roll(canary[broken], np.random.default_rng(14).integers(1, 10), axis=1)
        canary_totals = totals(canary, failures)
        return LiveEvidence(canary_totals, totals(stable), pairs_of(stable, canary), elapsed_s)


def traffic(images: int, rich_in: tuple[int, ...] = (), share: float = 0.0, seed: int = 5) -> np.ndarray:
    """True classes of `images` live images: uniform, or `share` of them from the classes `rich_in`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, images)
    rich = rng.random(images) < share
    labels[rich] = rng.choice(rich_in or (0,), rich.sum())
    return labels


def register(registry: Registry, accuracy: float, calibration: Calibration, predictions: np.ndarray, rollout: str):
    """A version as the register stage publishes it (`register_model`), with what the judge reads; no training."""
    tag = f"{accuracy}-{len(registry.versions())}"
    run = join(registry.root, "runs", tag)
    files = run_files(registry.store, run, tag)
    buffer = io.BytesIO()
    np.save(buffer, predictions)
    location = join(run, RunLayout.TEST_PREDICTIONS)
    registry.store.write_bytes(location, buffer.getvalue())
    model, metrics = files["model.keras"], files["metrics.json"]
    trained = TrainResult(RunLayout(run), model, metrics, "CPU", False, {}, {}, 1, 1, 1.0, 0.5, accuracy)
    predicted = StoredFile(location, registry.store.sha256(location))
    evaluation = Evaluation(
        accuracy, 0.5, accuracy, 0.5, 0.0, [], [], model.sha256, metrics, {}, {}, calibration, predicted
    )
    manifest = run_manifest(accuracy, fingerprint=tag)
    data = manifest.data.model_copy(update={"test_rows": HELD_OUT})  # one prediction per held-out image
    manifest = manifest.model_copy(update={"calibration": calibration, "data": data})
    return register_model(registry, trained, evaluation, manifest, GATE.model_copy(update={"rollout": rollout}))


def evidence_window(
    version: str, label: str, source: str, evidence: EvidenceTotals, start: float, replica: str = "ab" * 16, **pairs
) -> EvidenceWindow:
    """`evidence` as one server's window of a minute from `start`."""
    return EvidenceWindow(
        replica=replica,
        version=version,
        label=label,
        source=source,
        start=start,
        end=start + 60,
        requests=evidence.requests,
        images=evidence.images,
        errors=evidence.errors,
        latency_ms=evidence.latency_ms,
        predicted=evidence.predicted,
        confidence=evidence.confidence,
        probabilities=evidence.probabilities,
        **pairs,
    )


def write_windows(
    registry: Registry,
    version: str,
    label: str,
    source: str,
    evidence: EvidenceTotals,
    ago_s: float = 0,
    **pairs,
):
    """`evidence` as one server's window of a minute ending `ago_s` ago, written where servers write them."""
    window = evidence_window(version, label, source, evidence, time.time() - ago_s - 60, **pairs)
    registry.store.create(window_location(registry.root, window), window.model_dump_json().encode())


def roll_out(registry: Registry, versions: Versions, live: LiveEvidence) -> None:
    """v0001 champion and v0002 its canary, registered through the canary policy, and `live` as one server's
    windows: stable's served, the canary's shadowed against v0001."""
    offline = versions.offline
    register(registry, 0.88, offline.stable_calibration, offline.stable_predictions, "canary")
    register(registry, 0.88, offline.canary_calibration, offline.canary_predictions, "canary")
    write_windows(registry, "v0001", "stable", "served", live.stable)
    write_windows(registry, "v0002", "canary", "shadow", live.canary, paired_with="v0001", pairs=live.pairs.tolist())


def write_ledger(store, feedback: str, batch: str, answers: list[tuple[str, int, int, float]], *, old: bool = False):
    """A review ledger as `review --submit` writes it, of (version, predicted class, true class, served at)
    answers; `old`: as ledgers were before they kept what was answered and when."""
    records = []
    for number, (version, predicted, truth, at) in enumerate(answers):
        record = {"id": f"{number:032x}", "version": version, "labeled": CLASS_SLUGS[truth], "label": "stable"}
        if not old:
            record |= {"predicted": CLASS_SLUGS[predicted], "at": datetime.fromtimestamp(at, UTC).isoformat()}
        records.append(record)
    ledger = ReviewedBatch(
        batch=batch,
        at=datetime.now(UTC).isoformat(),
        submitted=len(records),
        relabeled=sum(p != t for _, p, t, _ in answers),
        deleted=0,
        served_versions={},
        records=records,
    )
    store.create(ledger_location(feedback, batch), ledger.model_dump_json().encode())
