"""After the gate, measured: how long a canary rollout takes to be decided, how soon the champion's watch
says drift (and how often it says it on undrifted traffic), and what the servers' evidence costs them.

Three dnn versions are trained on the real data (as bench/estimates.py does) and evaluated as a run does
(`evaluate_model`: calibration and test predictions); then, each figure with its conditions:

1. The rollout, registration to decision: a registry on local disk with the first version as champion;
   a real `fashion-mnist serve` process (--canary-share, --shadow-share, --evidence-window-s) sent real
   test images, one a request, at a fixed rate by a client loop; the next version registered under the
   canary policy (`register_model` with `PromotionParams(rollout="canary")`), and `judge_rollout` called
   every few seconds until it decides. Once for an equal canary (another seed, uniform traffic: promote),
   once for a worse one (trained with 70% of the T-shirt/top and Shirt labels swapped, on traffic 8 times as
   rich in those classes: rolled back). It must pass the gate to be a canary at all, so its gate is widened.
2. The watch (`fmnist.evaluation.monitor.monitor`): the first model's real probabilities on the second half
   of the test set (its calibration fitted on the first half), drawn with replacement into periods of
   100, 300 and 1000 images, unshifted and under noise of three strengths and a class mix rich in T-shirt and
   Shirt: the periods (and images) until drift is said (two drifted periods in a row); and over many
   undrifted periods, the share that drift and how often drift is said.
3. Serving throughput with evidence on and off (`--evidence-window-s 0`), alternating on fresh servers.

Prints each part's figures, then one JSON line. A few minutes on 2 cores.

    .venv/bin/python bench/rollout.py [--epochs 3] [--rate 30] [--min-samples 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the other benches' helpers

from bench.estimates import LOCAL_MIRROR, RICH_CLASSES, SHIFTS, pixels  # noqa: E402
from bench.serve_load import PREDICT, Server, figures, http_request, rest_clients  # noqa: E402
from fmnist.data.cache import (  # noqa: E402
    CachedDataset,
    PartCache,
    normalize,
    pixels_of,
    read_part,
    read_pixels,
    verified_path,
)
from fmnist.data.dataset import FASHION_MNIST, NUM_CLASSES  # noqa: E402
from fmnist.data.download import RawDataset, download_dataset  # noqa: E402
from fmnist.data.normalization import normalize_and_cache  # noqa: E402
from fmnist.data.validation import validate_raw  # noqa: E402
from fmnist.evaluation.estimates import (  # noqa: E402
    Calibration,
    confidence_counts,
    fit_calibration,
    probability_counts,
)
from fmnist.evaluation.evaluate import Evaluation, evaluate_model, predicted_probabilities  # noqa: E402
from fmnist.evaluation.evidence import EvidenceWindow  # noqa: E402
from fmnist.evaluation.monitor import MonitorParams, monitor  # noqa: E402
from fmnist.registry.gate import PromotionParams  # noqa: E402
from fmnist.registry.judge import JudgeParams  # noqa: E402
from fmnist.registry.judging import judge_rollout  # noqa: E402
from fmnist.registry.manifest import RunManifest, build_manifest  # noqa: E402
from fmnist.registry.registration import register_model  # noqa: E402
from fmnist.registry.versions import Registry  # noqa: E402
from fmnist.storage import Store  # noqa: E402
from fmnist.storage.layout import DataLayout, RunLayout  # noqa: E402
from fmnist.training.fit import TrainResult, train_model  # noqa: E402
from fmnist.training.model import TrainParams, load_verified_model  # noqa: E402
from fmnist.training.run_folder import RunFolder  # noqa: E402

SWAP_SHARE = 0.7  # of the T-shirt/top and Shirt training labels, swapped for the worse canary
# The gates the two canaries pass (the rollout's subject is what happens after it): seeds differ by up to a
# point of test accuracy; the worse canary loses several points offline and must still become a canary.
EQUAL_CANARY_GATE = PromotionParams(rollout="canary", tolerance=0.02)
WORSE_CANARY_GATE = PromotionParams(rollout="canary", tolerance=0.15, min_accuracy=0.7)
RICH_WEIGHT = 8.0  # the worse canary's traffic: RICH_CLASSES this many times as common as each other class
JUDGE_EVERY_S = 3.0
DECISION_TIMEOUT_S = 180.0
PERIOD_SIZES = (100, 300, 1000)
DRIFTED_MAX_PERIODS = 12  # periods of shifted traffic watched before "not said"
WATCH_SHIFTS = {
    "noise 0.1": SHIFTS["noise 0.1"],
    "noise 0.2": pixels(lambda x, rng: x + rng.normal(0, 0.2, x.shape)),
    "noise 0.3": SHIFTS["noise 0.3"],
    "rich in T-shirt and Shirt": SHIFTS["rich in T-shirt and Shirt"],
}
PERIOD_S = 60.0  # the watch's period in seconds; each synthetic period is one window this long
REPLICA = "0" * 32
EVIDENCE_WINDOW_S = 5  # the servers' evidence window when the throughput runs count evidence
EVIDENCE_ON = f"evidence on ({EVIDENCE_WINDOW_S} s windows)"


@dataclasses.dataclass(frozen=True)
class TrainedVersion:
    """A version trained and evaluated as a run does it, ready to be registered."""

    trained: TrainResult
    evaluation: Evaluation
    manifest: RunManifest


def real_data(folder: Path, store: Store) -> tuple[RawDataset, CachedDataset]:
    layout = DataLayout(str(folder / "data"))
    raw = download_dataset(FASHION_MNIST, [LOCAL_MIRROR], store, layout.raw)
    report = validate_raw(FASHION_MNIST, raw, [], store, layout.validation)
    return raw, normalize_and_cache(FASHION_MNIST, raw, [], report, store, layout)


def swapped_labels_cache(cached: CachedDataset, store: Store, folder: Path, seed: int) -> CachedDataset:
    """The training split with SWAP_SHARE of the RICH_CLASSES' labels swapped for each other."""
    images, labels = read_pixels(store, cached.train)
    chosen = np.isin(labels, RICH_CLASSES) & (np.random.default_rng(seed).random(len(labels)) < SWAP_SHARE)
    a, b = RICH_CLASSES
    labels[chosen] = np.where(labels[chosen] == a, b, a)
    key = hashlib.sha256(f"{cached.key} swapped {RICH_CLASSES} {SWAP_SHARE} {seed}".encode()).hexdigest()
    part = PartCache(store, str(folder / "swapped")).write_part(key, normalize(images), labels, {})
    return dataclasses.replace(cached, key=key, train=[part])


def trained_version(
    raw: RawDataset, cached: CachedDataset, params: TrainParams, store: Store, folder: Path
) -> TrainedVersion:
    run = RunFolder(store, RunLayout(str(folder)))
    trained = train_model(cached, params, run)
    evaluation = evaluate_model(trained, cached, run)
    manifest = build_manifest(
        raw=raw, cached=cached, params=params, trained=trained, evaluation=evaluation, flow_run_id=None
    )
    return TrainedVersion(trained, evaluation, manifest)


def register(registry: Registry, version: TrainedVersion, promotion: PromotionParams):
    return register_model(registry, version.trained, version.evaluation, version.manifest, promotion)


class FixedRateClient:
    """One request of one image every 1/rate s to the server's REST predict, in a thread, until stopped;
    a request late by more than its slot is sent at once (no bursts to catch up)."""

    def __init__(self, url: str, bodies: list[bytes], rate: float) -> None:
        self.url, self.bodies, self.rate = url, bodies, rate
        self.sent = self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FixedRateClient:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=10) as client:
            due = time.monotonic()
            while not self._stop.is_set():
                try:
                    answer = client.post(self.url, content=self.bodies[self.sent % len(self.bodies)], headers=headers)
                    self.errors += answer.status_code != 200
                except httpx.HTTPError:
                    self.errors += 1
                self.sent += 1
                due = max(due + 1 / self.rate, time.monotonic())
                self._stop.wait(due - time.monotonic())


def request_bodies(images: np.ndarray, labels: np.ndarray, rich_weight: float, count: int, seed: int) -> list[bytes]:
    """`count` one-image predict bodies of test images; RICH_CLASSES `rich_weight` times as common as the rest."""
    weights = np.where(np.isin(labels, RICH_CLASSES), rich_weight, 1.0)
    chosen = np.random.default_rng(seed).choice(len(labels), count, p=weights / weights.sum())
    return [json.dumps({"instances": [images[i].tolist()]}).encode() for i in chosen]


def decided_rollout(
    registry: Registry, version: TrainedVersion, promotion: PromotionParams, client: FixedRateClient, rule: JudgeParams
) -> dict:
    """Register `version` (the canary policy) while `client` sends traffic; judge until the judge decides."""
    registration = register(registry, version, promotion)
    if not registration.canary:
        raise SystemExit(f"{registration.version} was not made the canary: {registration.decision.reason}")
    registered, sent = time.monotonic(), client.sent
    judgements = 0
    while time.monotonic() - registered < DECISION_TIMEOUT_S:
        time.sleep(JUDGE_EVERY_S)
        judgement = judge_rollout(registry, rule)
        judgements += 1
        if judgement.verdict and judgement.verdict.action != "wait":
            break
    verdict = judgement.verdict
    return {
        "version": registration.version,
        "test_accuracy": round(version.evaluation.test_accuracy, 4),
        "action": verdict.action if verdict else "none",
        "reason": verdict.reason if verdict else "no rollout in progress",
        "seconds": round(time.monotonic() - registered, 1),
        "images_sent": client.sent - sent,
        "canary_images": verdict.canary_images if verdict else 0,
        "judgements": judgements,
        "client_errors": client.errors,
    }


def rollout_figures(
    registry: Registry,
    equal: TrainedVersion,
    worse: TrainedVersion,
    test: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
    logs: Path,
) -> list[dict]:
    images, labels = test
    options = ["--poll-s", "1", "--canary-share", str(args.canary_share), "--shadow-share", str(args.shadow_share)]
    server = Server(registry.root, logs / "serve-rollout.log", *options, "--evidence-window-s", str(args.window_s))
    url = f"http://127.0.0.1:{server.port}{PREDICT}"
    rule = JudgeParams(min_samples=args.min_samples)
    rows = []
    try:
        for name, version, rich_weight, promotion in (
            ("equal canary, uniform traffic", equal, 1.0, EQUAL_CANARY_GATE),
            (f"worse canary, traffic {RICH_WEIGHT:g}x rich in T-shirt, Shirt", worse, RICH_WEIGHT, WORSE_CANARY_GATE),
        ):
            bodies = request_bodies(images, labels, rich_weight, 1024, seed=len(rows))
            with FixedRateClient(url, bodies, args.rate) as client:
                rows.append({"rollout": name, **decided_rollout(registry, version, promotion, client, rule)})
            print(
                f"{name:58}{rows[-1]['action']:>10}{rows[-1]['seconds']:>9.1f}{rows[-1]['images_sent']:>9}"
                f"{rows[-1]['canary_images']:>9}   {rows[-1]['reason']}"
            )
    finally:
        server.stop()
    return rows


def window_of(probabilities: np.ndarray, index: int) -> EvidenceWindow:
    """One period's images as a server's window over it would count them (served by stable)."""
    start = index * PERIOD_S
    return EvidenceWindow(
        replica=REPLICA,
        version="v0001",
        label="stable",
        source="served",
        start=start,
        end=start + PERIOD_S,
        requests=len(probabilities),
        images=len(probabilities),
        predicted=np.bincount(probabilities.argmax(axis=1), minlength=NUM_CLASSES).tolist(),
        confidence=confidence_counts(probabilities).tolist(),
        probabilities=probability_counts(probabilities).tolist(),
    )


def watched(
    pool: np.ndarray, size: int, periods: int, calibration: Calibration, accuracy: float, rng: np.random.Generator
) -> tuple[list[bool], bool]:
    """`periods` periods of `size` images drawn from `pool` (probabilities), judged by the monitor: each
    period's drifted flag, and whether drift is said after the last."""
    windows = [window_of(pool[rng.integers(0, len(pool), size)], i) for i in range(periods)]
    params = MonitorParams(period_s=PERIOD_S, min_images=size)
    report = monitor("v0001", accuracy, windows, calibration, params)
    return [p.drifted for p in report.periods], report.drift


def first_said(drifted: list[bool], in_a_row: int) -> int | None:
    """The period (1-based) at which `in_a_row` drifted periods in a row are first complete."""
    run = 0
    for index, flag in enumerate(drifted, 1):
        run = run + 1 if flag else 0
        if run == in_a_row:
            return index
    return None


def watch_figures(model, images: np.ndarray, labels: np.ndarray, undrifted_periods: int, seed: int) -> dict:
    half = len(labels) // 2
    calibration = fit_calibration(predicted_probabilities(model, images[:half]), labels[:half])
    unshifted = predicted_probabilities(model, images[half:])
    accuracy = float((unshifted.argmax(axis=1) == labels[half:]).mean())
    rng = np.random.default_rng(seed)
    in_a_row = MonitorParams().drifted_periods
    undrifted = {}
    for size in PERIOD_SIZES:
        flags, _ = watched(unshifted, size, undrifted_periods, calibration, accuracy, rng)
        said = sum(all(flags[i - in_a_row + 1 : i + 1]) for i in range(in_a_row - 1, len(flags)))
        undrifted[size] = {"periods": len(flags), "drifted_share": round(float(np.mean(flags)), 4), "said": said}
        print(
            f"undrifted, periods of {size:>4}: {np.mean(flags):.3f} of {len(flags)} periods drifted; "
            f"drift said {said} times"
        )
    delays = []
    for name, shift in WATCH_SHIFTS.items():
        shifted_images, shifted_labels = shift(images[half:], labels[half:], rng)
        pool = predicted_probabilities(model, shifted_images)
        true_accuracy = float((pool.argmax(axis=1) == shifted_labels).mean())
        for size in PERIOD_SIZES:
            flags, _ = watched(pool, size, DRIFTED_MAX_PERIODS, calibration, accuracy, rng)
            said = first_said(flags, in_a_row)
            delays.append(
                {
                    "shift": name,
                    "true_accuracy": round(true_accuracy, 4),
                    "period_images": size,
                    "drifted_share": round(float(np.mean(flags)), 3),
                    "said_at_period": said,
                    "said_at_images": said * size if said else None,
                }
            )
            when = f"said at period {said} ({said * size} images)" if said else f"not said in {DRIFTED_MAX_PERIODS}"
            print(f"{name:28} (true accuracy {true_accuracy:.3f}), periods of {size:>4}: {when}")
    return {"undrifted": undrifted, "shifted": delays, "drifted_periods": in_a_row, "alpha": MonitorParams().alpha}


def evidence_cost(registry: str, images: np.ndarray, seconds: float, rounds: int, logs: Path) -> dict:
    """16 keep-alive clients, one image a request, on fresh servers with evidence off and on, alternating."""
    ordinary = [http_request(PREDICT, json.dumps({"instances": [i.tolist()]}).encode()) for i in images[:256]]
    settings = {"evidence off": "0", EVIDENCE_ON: str(EVIDENCE_WINDOW_S)}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(rounds):
        for name, window in settings.items():
            server = Server(registry, logs / "serve-evidence.log", "--evidence-window-s", window)
            try:
                asyncio.run(rest_clients(server.port, ordinary, 16, 1.0))  # warm-up
                runs[name].append(figures(*asyncio.run(rest_clients(server.port, ordinary, 16, seconds)), seconds, 1))
            finally:
                server.stop()
    medians = {name: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}
    for name, row in medians.items():
        print(
            f"{name + f' (median of {rounds})':40}{row['images_per_s']:>10.0f}{row['p50_ms']:>9.1f}"
            f"{row['p99_ms']:>9.1f}{row['errors']:>8.0f}"
        )
    ratio = medians[EVIDENCE_ON]["images_per_s"] / medians["evidence off"]["images_per_s"]
    print(f"throughput with evidence on: {ratio:.2f}x evidence off")
    return {"runs": medians, "ratio": round(ratio, 3), "seconds": seconds, "clients": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=30.0, help="requests a second (one image each) in a rollout")
    parser.add_argument("--canary-share", type=float, default=0.1)
    parser.add_argument("--shadow-share", type=float, default=1.0)
    parser.add_argument("--window-s", type=int, default=5, help="the servers' evidence window in a rollout")
    parser.add_argument("--min-samples", type=int, default=JudgeParams().min_samples, help="the judge's min_samples")
    parser.add_argument("--undrifted-periods", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0, help="each throughput run")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of evidence off and on")
    args = parser.parse_args()

    started = time.perf_counter()
    store = Store()
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        folder = Path(tmp)
        raw, cached = real_data(folder, store)
        swapped = swapped_labels_cache(cached, store, folder, seed=0)
        champion, equal, worse = (
            trained_version(raw, data, TrainParams(preset="dnn", epochs=args.epochs, seed=seed), store, folder / name)
            for name, data, seed in (("run-0", cached, 0), ("run-1", cached, 1), ("run-swapped", swapped, 2))
        )
        trained_at = time.perf_counter() - started
        test_pixels, test_labels = read_part(verified_path(store, cached.test))
        test_labels = test_labels.astype(np.int64)
        accuracies = ", ".join(f"{v.evaluation.test_accuracy:.4f}" for v in (champion, equal, worse))
        print(f"three versions trained and evaluated ({args.epochs} epochs each) in {trained_at:.0f} s")
        print(f"test accuracy: champion, equal canary, worse canary {accuracies}")

        print(f"\nThe watch: periods until drift is said ({MonitorParams().drifted_periods} drifted in a row)")
        model = load_verified_model(store, champion.trained.model)
        watch = watch_figures(model, test_pixels, test_labels, args.undrifted_periods, seed=0)

        registry = Registry(store, str(folder / "registry"))
        register(registry, champion, PromotionParams(rollout="canary"))  # the first version: champion at once
        print(
            f"\nThe rollout at {args.rate:g} requests/s of one image, canary share {args.canary_share:g}, shadow "
            f"share {args.shadow_share:g}, {args.window_s} s evidence windows, min_samples {args.min_samples}, "
            f"judged every {JUDGE_EVERY_S:g} s:"
        )
        print(f"{'':58}{'decided':>10}{'seconds':>9}{'sent':>9}{'canary':>9}")
        test = (pixels_of(test_pixels).reshape(-1, 28, 28), test_labels)
        rollouts = rollout_figures(registry, equal, worse, test, args, folder)

        print(f"\nServing throughput, evidence off and on, 16 clients, one image a request, {args.seconds:g} s a run:")
        cost = evidence_cost(registry.root, test[0], args.seconds, args.rounds, folder)
    print(f"{time.perf_counter() - started:.0f} s in all")
    print(json.dumps({"bench": "rollout", **vars(args), "rollouts": rollouts, "watch": watch, "evidence": cost}))


if __name__ == "__main__":
    main()
