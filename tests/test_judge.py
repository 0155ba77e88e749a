"""The rollout judge's rule on synthetic models whose true behaviour is known, and the judge acting on a real
registry (local disk and a real S3 server's bucket) from evidence windows as servers write them."""

from __future__ import annotations

import io
import time
from dataclasses import replace

import numpy as np
import pytest

from fmnist.data.dataset import NUM_CLASSES
from fmnist.evaluation.estimates import Calibration, confidence_counts, fit_calibration, probability_counts
from fmnist.evaluation.evaluate import Evaluation
from fmnist.evaluation.evidence import LATENCY_BOUNDS_MS, MODEL_FAILED, EvidenceTotals, EvidenceWindow, window_location
from fmnist.registry.judge import JudgeParams, LiveEvidence, Offline, judge
from fmnist.registry.judging import judge_rollout
from fmnist.registry.labels import CANARY, Labels
from fmnist.registry.registration import prior_run, register_model
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import Registry
from fmnist.storage import Store, StoredFile, join
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

    def __init__(self, canary_swap_rate: float = 0.0) -> None:
        labels = np.arange(HELD_OUT) % NUM_CLASSES
        self.stable_held_out = answers(labels, seed=1)
        self.canary_held_out = answers(labels, seed=2, swap_rate=canary_swap_rate)
        self.canary_swap_rate = canary_swap_rate
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
        canary = answers(labels, seed=12, swap_rate=self.canary_swap_rate)
        broken = np.random.default_rng(13).random(len(labels)) < canary_broken
        canary[broken] = np.roll(canary[broken], np.random.default_rng(14).integers(1, 10), axis=1)
        canary_totals = totals(canary, failures)
        return LiveEvidence(canary_totals, canary_totals, totals(stable), pairs_of(stable, canary), elapsed_s)


def traffic(images: int, rich_in: tuple[int, ...] = (), share: float = 0.0, seed: int = 5) -> np.ndarray:
    """True classes of `images` live images: uniform, or `share` of them from the classes `rich_in`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, images)
    rich = rng.random(images) < share
    labels[rich] = rng.choice(rich_in or (0,), rich.sum())
    return labels


def failed(verdict) -> set[str]:
    return {c.name for c in verdict.checks if c.status == "fail"}


def test_an_equal_canary_waits_for_the_minimum_sample_then_is_promoted() -> None:
    versions = Versions()
    early = judge(versions.live(traffic(500)), versions.offline, RULE)
    assert early.action == "wait" and "500 of 2000 images" in early.reason, early
    verdict = judge(versions.live(traffic(3000)), versions.offline, RULE)
    assert verdict.action == "promote", verdict
    assert {c.status for c in verdict.checks} == {"pass"}, verdict.checks
    agreement = next(c for c in verdict.checks if c.name == "shadow agreement")
    assert abs(agreement.canary - agreement.reference) < 0.03  # live agreement as the test set predicts


def test_a_canary_worse_on_the_classes_users_send_is_rolled_back_though_it_passed_offline() -> None:
    versions = Versions(canary_swap_rate=0.1)
    offline_gap = (versions.stable_held_out.argmax(axis=1) == np.arange(HELD_OUT) % 10).mean() - (
        versions.canary_held_out.argmax(axis=1) == np.arange(HELD_OUT) % 10
    ).mean()
    assert offline_gap < 0.02  # balanced held-out images: 2 classes of 10, so the swap costs it little offline
    verdict = judge(versions.live(traffic(3000, SWAPPED, 0.8)), versions.offline, RULE)
    assert verdict.action == "roll_back", verdict
    assert "accuracy under the live class mix" in failed(verdict), verdict.checks
    # On traffic like the test set's it is as little worse as offline, within the margin: not caught.
    uniform = judge(versions.live(traffic(3000)), versions.offline, RULE)
    assert not failed(uniform), uniform.checks


def test_a_canary_that_disagrees_more_live_than_on_the_test_set_is_rolled_back() -> None:
    versions = Versions()
    verdict = judge(versions.live(traffic(3000), canary_broken=0.2), versions.offline, RULE)
    assert verdict.action == "roll_back" and "shadow agreement" in failed(verdict), verdict.checks
    # The same shortfall on few images is not yet a verdict on agreement: its bound is wide.
    few = judge(versions.live(traffic(60), canary_broken=0.08), versions.offline, RULE)
    assert "shadow agreement" not in failed(few)


def test_service_objectives_roll_back_a_failing_or_slow_canary() -> None:
    versions = Versions()
    evidence = versions.live(traffic(3000), failures=150)
    verdict = judge(evidence, versions.offline, RULE)
    assert verdict.action == "roll_back" and failed(verdict) == {"error rate"}, verdict.checks
    slow = replace(evidence.canary_served, errors={}, latency_ms=[0] * len(LATENCY_BOUNDS_MS) + [3150])
    verdict = judge(replace(evidence, canary_served=slow), versions.offline, RULE)
    assert failed(verdict) == {"p99 latency"} and "above 10000 ms" in verdict.reason, verdict
    assert verdict.summary()["checks"]["p99 latency"]["canary"] is None  # no infinity in JSON


def test_at_the_maximum_duration_the_judge_decides_on_what_it_has() -> None:
    versions = Versions()
    quiet = replace(versions.live(traffic(300)), elapsed_s=RULE.max_duration_s)
    verdict = judge(quiet, versions.offline, RULE)
    assert verdict.action == "promote" and "300 of 2000" in verdict.reason, verdict
    nothing = LiveEvidence(EvidenceTotals(), EvidenceTotals(), EvidenceTotals(), None, RULE.max_duration_s)
    verdict = judge(nothing, versions.offline, RULE)
    assert verdict.action == "roll_back" and "no live traffic" in verdict.reason
    assert judge(replace(nothing, elapsed_s=60), versions.offline, RULE).action == "wait"


def test_versions_registered_before_calibrations_are_judged_on_what_they_have() -> None:
    versions = Versions()
    unknown = Offline(None, None, None, None)
    verdict = judge(versions.live(traffic(3000)), unknown, RULE)
    statuses = {c.name: c.status for c in verdict.checks}
    assert statuses["shadow agreement"] == statuses["accuracy by ATC"] == "unavailable"
    assert verdict.action == "promote" and statuses["error rate"] == "pass"


# --- on a registry ---------------------------------------------------------------------------------------


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    return Registry(store, root + "/registry")


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


def write_windows(registry: Registry, version: str, label: str, source: str, evidence: EvidenceTotals, **pairs):
    """`evidence` as one server's window of the last minute, written where servers write them."""
    now = time.time()
    window = EvidenceWindow(
        replica="ab" * 16,
        version=version,
        label=label,
        source=source,
        start=now - 60,
        end=now,
        requests=evidence.requests,
        images=evidence.images,
        errors=evidence.errors,
        latency_ms=evidence.latency_ms,
        predicted=evidence.predicted,
        confidence=evidence.confidence,
        probabilities=evidence.probabilities,
        **pairs,
    )
    registry.store.create(window_location(registry.root, window), window.model_dump_json().encode())


@pytest.mark.parametrize("swap_rate", [0.0, 0.1], ids=["equal", "swapped"])
def test_the_judge_promotes_or_rolls_back_the_registrys_canary_from_the_windows(
    registry: Registry, swap_rate: float
) -> None:
    versions = Versions(canary_swap_rate=swap_rate)
    offline = versions.offline
    assert register(registry, 0.88, offline.stable_calibration, offline.stable_predictions, "canary").promoted
    second = register(registry, 0.88, offline.canary_calibration, offline.canary_predictions, "canary")
    assert not second.promoted and Rollouts(registry).active().version == "v0002"
    assert judge_rollout(registry, RULE).verdict.action == "wait"  # no evidence yet

    live = versions.live(traffic(3000, SWAPPED, 0.8 if swap_rate else 0.0))
    write_windows(registry, "v0001", "stable", "served", live.stable)
    pairs = {"paired_with": "v0001", "pairs": live.pairs.tolist()}
    write_windows(registry, "v0002", "canary", "shadow", live.canary, **pairs)
    judgement = judge_rollout(registry, RULE)
    assert judgement.verdict.action != "wait", judgement
    [row] = judgement.timeline  # one window: one period of the report
    assert row.canary_images == 3000 and abs(row.agreement - np.trace(live.pairs) / 3000) < 1e-9
    record = Rollouts(registry).record("v0002")
    assert Labels(registry).records().get(CANARY) is None  # served as canary no more, either way
    if swap_rate:
        assert judgement.verdict.action == "roll_back" and registry.champion() == "v0001"
        assert record.outcome == "rolled_back" and record.evidence["canary_images"] == 3000
        prior = prior_run(registry, "0.88-1", GATE)
        assert prior is not None and not prior.promoted and "rolled back" in prior.message
    else:
        assert judgement.verdict.action == "promote" and registry.champion() == "v0002"
        assert record.outcome == "promoted"
        assert "live evidence" in registry.promotions()[-1]["reason"]
    assert judge_rollout(registry, RULE).version is None  # decided once; nothing left to judge
