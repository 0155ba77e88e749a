"""The label-free accuracy estimates against the truth on shifted test images, with a model trained on the
real data, and whether the drift tests flag each shift.

The data goes through download, validation and the parquet cache into a temporary folder; the dnn preset
trains with `train_model` as in a run. The test set is split in two halves: the Calibration is fitted on
the first (as registration fits it on the whole test set), and each shift is applied to the second, so that
no estimate is scored on the images it was fitted on. For each shift: the true accuracy, each estimate and
its error |estimated - true|, and the drift tests' verdict on one window of `--window` images.
Prints a table and one JSON line.

    .venv/bin/python bench/estimates.py --epochs 5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from fmnist.data.cache import read_part, verified_path
from fmnist.data.dataset import FASHION_MNIST
from fmnist.data.download import download_dataset
from fmnist.data.normalization import normalize_and_cache
from fmnist.data.validation import validate_raw
from fmnist.evaluation.estimates import (
    atc_estimate,
    cbpe_estimate,
    class_mix_shift,
    confidence_counts,
    fit_calibration,
    mix_weighted_accuracy,
    probability_counts,
    softmax_shift,
)
from fmnist.evaluation.evaluate import predicted_probabilities
from fmnist.storage import Store
from fmnist.storage.layout import DataLayout, RunLayout
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams, load_verified_model
from fmnist.training.run_folder import RunFolder

LOCAL_MIRROR = "/usr/share/datasets/fashion-mnist"
ALPHA = 0.05
RICH_CLASSES = (0, 6)  # T-shirt/top and Shirt: the pair the model confuses most
Shift = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def pixels(transform: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Shift:
    """A shift of the images alone (the labels stay), kept in [0, 1] as the model's input is."""
    return lambda images, labels, rng: (np.clip(transform(images, rng), 0, 1).astype(np.float32), labels)


def partly_inverted(images: np.ndarray, rng: np.random.Generator, share: float = 0.3) -> np.ndarray:
    chosen = rng.random(len(images)) < share
    return np.where(chosen[:, None, None], 1 - images, images)


def rich_in(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A class mix where RICH_CLASSES are 8 times as common as each other class (drawn with replacement)."""
    weights = np.where(np.isin(labels, RICH_CLASSES), 8.0, 1.0)
    chosen = rng.choice(len(labels), len(labels), p=weights / weights.sum())
    return images[chosen], labels[chosen]


SHIFTS: dict[str, Shift] = {
    "none": lambda images, labels, rng: (images, labels),
    "noise 0.1": pixels(lambda x, rng: x + rng.normal(0, 0.1, x.shape)),
    "noise 0.3": pixels(lambda x, rng: x + rng.normal(0, 0.3, x.shape)),
    "blur 1 px": pixels(lambda x, rng: ndimage.gaussian_filter(x, sigma=(0, 1, 1))),
    "contrast x0.5": pixels(lambda x, rng: 0.5 * (x - x.mean()) + x.mean()),
    "brightness +0.3": pixels(lambda x, rng: x + 0.3),
    "shifted 3 px": pixels(lambda x, rng: ndimage.shift(x, (0, 3, 3), order=0)),
    "30% inverted": pixels(partly_inverted),
    "rich in T-shirt and Shirt": rich_in,
}


def trained_model(epochs: int, seed: int, folder: Path):
    layout, store = DataLayout(str(folder / "data")), Store()
    raw = download_dataset(FASHION_MNIST, [LOCAL_MIRROR], store, layout.raw)
    report = validate_raw(FASHION_MNIST, raw, [], store, layout.validation)
    cached = normalize_and_cache(FASHION_MNIST, raw, [], report, store, layout)
    run = RunFolder(store, RunLayout(str(folder / "run")))
    trained = train_model(cached, TrainParams(preset="dnn", epochs=epochs, seed=seed), run)
    images, labels = read_part(verified_path(store, cached.test))
    return load_verified_model(store, trained.model), images, labels.astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=500, help="images in the window the drift tests judge")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, images, labels = trained_model(args.epochs, args.seed, Path(tmp))
    half = len(labels) // 2
    calibration = fit_calibration(predicted_probabilities(model, images[:half]), labels[:half])
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, shift in SHIFTS.items():
        shifted, truth_labels = shift(images[half:], labels[half:], rng)
        probabilities = predicted_probabilities(model, shifted)
        predicted = probabilities.argmax(axis=1)
        counts = confidence_counts(probabilities)
        class_counts = np.bincount(predicted, minlength=10)
        truth = float((predicted == truth_labels).mean())
        estimates = {
            "atc": atc_estimate(counts, calibration),
            "cbpe": cbpe_estimate(counts, calibration),
            "class_mix": mix_weighted_accuracy(class_counts, calibration),
        }
        window = probabilities[rng.choice(len(probabilities), args.window, replace=False)]
        window_classes = np.bincount(window.argmax(axis=1), minlength=10)
        rows.append(
            {
                "shift": name,
                "true_accuracy": truth,
                **estimates,
                **{f"{method}_error": abs(value - truth) for method, value in estimates.items()},
                "softmax_drift": softmax_shift(
                    calibration.reference_probabilities, probability_counts(window), ALPHA
                ).drifted,
                "class_mix_drift": class_mix_shift(calibration.reference_predicted, window_classes, ALPHA).drifted,
            }
        )

    print(f"\n{'shift':28}{'true':>7}{'ATC':>14}{'CBPE':>14}{'class mix':>14}   drift (softmax, mix) in {args.window}")
    for row in rows:
        cells = "".join(f"{row[m]:>7.3f} ({row[m + '_error']:.3f})" for m in ("atc", "cbpe", "class_mix"))
        print(
            f"{row['shift']:28}{row['true_accuracy']:>7.3f}{cells}   {row['softmax_drift']}, {row['class_mix_drift']}"
        )
    shifted_rows = [r for r in rows if r["shift"] != "none"]
    mean_errors = {m: float(np.mean([r[f"{m}_error"] for r in shifted_rows])) for m in ("atc", "cbpe", "class_mix")}
    print("mean error over the shifts: " + ", ".join(f"{m} {e:.3f}" for m, e in mean_errors.items()))
    print(f"{time.perf_counter() - started:.0f} s in all")
    summary = {"bench": "estimates", "epochs": args.epochs, "seed": args.seed, "window": args.window}
    print(json.dumps({**summary, "mean_errors": mean_errors, "shifts": rows}))


if __name__ == "__main__":
    main()
