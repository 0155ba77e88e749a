"""Each preset's test accuracy and training time on the real data: the pipeline's stages, seed by seed.

The data goes through download, validation and the parquet cache into a temporary folder once;
then each (preset, seed) trains with `train_model` and is scored by `evaluate_model`, as in a run.
Prints a table (per seed, and the median of the seeds) and one JSON line.

    .venv/bin/python bench/preset_accuracy.py --presets dnn dnn-tuned cnn --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fmnist.data.dataset import FASHION_MNIST
from fmnist.data.download import download_dataset
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import validate_raw
from fmnist.evaluation.evaluate import evaluate_model
from fmnist.storage import Store
from fmnist.storage.layout import DataLayout, RunLayout
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams
from fmnist.training.run_folder import RunFolder

LOCAL_MIRROR = "/usr/share/datasets/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["dnn", "dnn-tuned", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        layout, store = DataLayout(str(Path(tmp) / "data")), Store()
        raw = download_dataset(FASHION_MNIST, [LOCAL_MIRROR], store, layout.raw)
        report = validate_raw(FASHION_MNIST, raw, [], store, layout.validation)
        cached = normalize_and_cache(FASHION_MNIST, raw, [], report, store, layout)
        for preset in args.presets:
            for seed in args.seeds:
                run = RunFolder(store, RunLayout(str(Path(tmp) / f"run-{preset}-{seed}")))
                started = time.perf_counter()
                trained = train_model(cached, TrainParams(preset=preset, seed=seed), run)
                seconds = time.perf_counter() - started
                accuracy = evaluate_model(trained, cached, run).test_accuracy
                row = {"seed": seed, "test_accuracy": accuracy, "epochs": trained.epochs, "train_s": seconds}
                results.setdefault(preset, []).append(row)
                print(f"{preset:10} seed {seed}: {accuracy:.4f}, {trained.epochs} epochs, {seconds:.0f} s", flush=True)

    summary = {
        preset: {
            "median_test_accuracy": statistics.median(r["test_accuracy"] for r in rows),
            "median_train_s": statistics.median(r["train_s"] for r in rows),
            "runs": rows,
        }
        for preset, rows in results.items()
    }
    print(f"\n{'preset':12}{'median accuracy':>16}{'median training s':>19}   per seed")
    for preset, s in summary.items():
        seeds = ", ".join(f"{r['test_accuracy']:.4f}" for r in s["runs"])
        print(f"{preset:12}{s['median_test_accuracy']:>16.4f}{s['median_train_s']:>19.0f}   {seeds}")
    print(json.dumps({"bench": "preset_accuracy", "seeds": args.seeds, **summary}))


if __name__ == "__main__":
    main()
