"""Training speed: the project's training step against the tutorial's plain script, side by side.

Same machine, data, seed, epochs and batch size; each run in a fresh process, the two alternating,
`--rounds` times. Prints seconds per epoch (whole `fit` time / epochs) of both, their ratio, both
test accuracies, and the project's training arithmetic rate next to numpy's float32 matrix-multiply
rate measured in the same run. Then one JSON line.

    .venv/bin/python bench/train_speed.py [--rounds 2] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).parent
TARGETS = {"speedup": 1.5, "accuracy_drop": 0.005}
# Multiply-adds of the reference DNN per image, forward: 784x512 + 512x128 + 128x10.
FORWARD_FLOPS = 2 * (784 * 512 + 512 * 128 + 128 * 10)
# Backward: gradients of the weights of every layer and of the activations of all but the first.
BACKWARD_FLOPS = 2 * (784 * 512 + 2 * 512 * 128 + 2 * 128 * 10)


def project_run(seed: int, epochs: int) -> dict:
    """The pipeline's own stages: data from the parquet cache, then `train_model`."""
    import keras

    from fmnist.cache import read_split
    from fmnist.dataset import DEFAULT_MIRRORS, FASHION_MNIST
    from fmnist.download import download_dataset
    from fmnist.layout import DataLayout, RunLayout
    from fmnist.model import TrainParams
    from fmnist.normalization import normalize_and_cache
    from fmnist.run_folder import RunFolder
    from fmnist.storage import Store
    from fmnist.training import train_model
    from fmnist.validation import validate_raw

    with tempfile.TemporaryDirectory() as tmp:
        layout, store = DataLayout(str(Path(tmp) / "data")), Store()
        raw = download_dataset(FASHION_MNIST, DEFAULT_MIRRORS[:1], store, layout.raw)
        report = validate_raw(FASHION_MNIST, raw, [], store, layout.validation)
        cached = normalize_and_cache(FASHION_MNIST, raw, [], report, store, layout)
        started = time.perf_counter()
        result = train_model(
            cached, TrainParams(seed=seed, epochs=epochs), RunFolder(store, RunLayout(str(Path(tmp) / "run")))
        )
        fit_s = time.perf_counter() - started
        history = json.loads(Path(result.history.location).read_text())["epochs"]
        test_images, test_labels = read_split(Path(cached.test.path))
        model = keras.models.load_model(result.model.location)
        test_loss, test_acc = model.evaluate(test_images, test_labels, verbose=0)
    return {
        "epoch_s": [h["seconds"] for h in history],
        "train_model_s": fit_s,
        "test_accuracy": float(test_acc),
        "test_loss": float(test_loss),
    }


def plain_run(seed: int, epochs: int) -> dict:
    out = subprocess.run(
        [sys.executable, str(BENCH / "plain_tutorial.py"), "--seed", str(seed), "--epochs", str(epochs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(kind: str, seed: int, epochs: int) -> dict:
    if kind == "plain":
        return plain_run(seed, epochs)
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--seed", str(seed), "--epochs", str(epochs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def numpy_sgemm_rate() -> dict:
    """float32 matmul FLOP/s: at the model's first-layer shape, and at a large square size."""

    def rate(m: int, k: int, n: int, repeats: int) -> float:
        a = np.random.rand(m, k).astype(np.float32)
        b = np.random.rand(k, n).astype(np.float32)
        a @ b
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * m * k * n * repeats / (time.perf_counter() - started)

    return {"batch64_784x512": rate(64, 784, 512, 2000), "square_2048": rate(2048, 2048, 2048, 10)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(project_run(args.seed, args.epochs)))
        return

    runs: dict[str, list[dict]] = {"plain": [], "project": []}
    for _ in range(args.rounds):
        for kind in runs:
            runs[kind].append(child(kind, args.seed, args.epochs))
    sgemm = numpy_sgemm_rate()

    summary = {}
    for kind, results in runs.items():
        summary[kind] = {
            "seconds_per_epoch": statistics.median(sum(r["epoch_s"]) / len(r["epoch_s"]) for r in results),
            "steady_seconds_per_epoch": statistics.median(
                statistics.mean(r["epoch_s"][1:] or r["epoch_s"]) for r in results
            ),
            "test_accuracy": statistics.median(r["test_accuracy"] for r in results),
        }
    speedup = summary["plain"]["seconds_per_epoch"] / summary["project"]["seconds_per_epoch"]
    accuracy_delta = summary["project"]["test_accuracy"] - summary["plain"]["test_accuracy"]
    train_flops = 60_000 * (FORWARD_FLOPS + BACKWARD_FLOPS)
    project_rate = train_flops / summary["project"]["steady_seconds_per_epoch"]

    print(f"Reference DNN, {args.epochs} epochs, batch 64, seed {args.seed}, median of {args.rounds} rounds")
    print(f"{'':10}{'s/epoch':>10}{'steady s/epoch':>16}{'test accuracy':>15}")
    for kind, s in summary.items():
        print(
            f"{kind:10}{s['seconds_per_epoch']:>10.2f}{s['steady_seconds_per_epoch']:>16.2f}{s['test_accuracy']:>15.4f}"
        )
    print(
        f"speed-up {speedup:.2f}x (target >= {TARGETS['speedup']}x); "
        f"accuracy {accuracy_delta:+.4f} (target >= -{TARGETS['accuracy_drop']})"
    )
    print(
        f"training arithmetic {project_rate / 1e9:.0f} GFLOP/s ({train_flops:.2e} FLOP an epoch); "
        f"numpy sgemm {sgemm['batch64_784x512'] / 1e9:.0f} GFLOP/s at 64x784x512, "
        f"{sgemm['square_2048'] / 1e9:.0f} GFLOP/s at 2048^3; "
        f"ratio {project_rate / sgemm['square_2048']:.2f} of the large-matrix rate"
    )
    print(
        json.dumps(
            {
                "bench": "train_speed",
                "rounds": args.rounds,
                "epochs": args.epochs,
                **summary,
                "speedup": speedup,
                "accuracy_delta": accuracy_delta,
                "train_flop_per_s": project_rate,
                "numpy_sgemm_flop_per_s": sgemm,
                "flop_rate_ratio": project_rate / sgemm["square_2048"],
                "targets": TARGETS,
                "speedup_ok": speedup >= TARGETS["speedup"],
                "accuracy_ok": accuracy_delta >= -TARGETS["accuracy_drop"],
            }
        )
    )


if __name__ == "__main__":
    main()
