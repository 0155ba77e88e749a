"""Drift: does an incoming batch look like the canonical training data?

A batch can satisfy the data contract (28x28, labels 0-9, pixels 0-255) and still be unlike what the
model was made for: inverted images, another camera, one class only. Each batch is compared with the
canonical training split on its class proportions and on per-image summaries, through GX
distribution expectations:
- KL divergence of the batch's distribution from the training one (labels: the ten class weights;
  each summary: ten bins at the training split's deciles) below `KL_THRESHOLD`;
- the batch's median of each summary inside the training split's interquartile range.
A batch drawn from the training data gives KL divergences around 4.5 / rows (0.09 at 50 rows, 0.2 at
its 99th percentile); one class alone gives log(10) = 2.3, inverted images put every image in the
top bin (about 2.3 too). Batches under `MIN_ROWS` rows are too small to tell and are not judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from fmnist.data.dataset import NUM_CLASSES
from fmnist.storage.files import sha256_file

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

# What a run does with a drifted batch: warn and train on it, stop, or not check at all.
DriftSetting = Literal["warn", "fail", "off"]
KL_THRESHOLD = 0.5
MIN_ROWS = 50
BINS = 10
INK_LEVEL = 26  # a pixel brighter than 10% of full scale is ink (the background is 0)
FEATURES = {
    "mean_intensity": "mean pixel value, 0-1",
    "ink_fraction": f"share of pixels above {INK_LEVEL}",
    "contrast": "standard deviation of the pixels, 0-1",
}


@cache
def suite_version() -> str:
    """Changes whenever the drift expectations change, so cached results are re-checked."""
    return sha256_file(Path(__file__))


def image_features(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per image: its label and the summaries the drift check compares."""
    flat = images.reshape(len(images), -1)
    scaled = flat.astype(np.float32) / np.float32(255)
    return pd.DataFrame(
        {
            "row": np.arange(len(labels)),
            "label": labels.astype(np.int16),
            "mean_intensity": scaled.mean(axis=1),
            "ink_fraction": (flat > INK_LEVEL).mean(axis=1, dtype=np.float32),
            "contrast": scaled.std(axis=1),
        }
    )


@dataclass(frozen=True)
class FeatureReference:
    bins: list[float]  # edges from 0 to 1
    weights: list[float]  # the training split's share in each bin
    quartiles: tuple[float, float]


@dataclass(frozen=True)
class DriftReference:
    """The canonical training split, summarised: what each batch is compared with."""

    label_weights: list[float]
    features: dict[str, FeatureReference]


def reference(images: np.ndarray, labels: np.ndarray) -> DriftReference:
    frame = image_features(images, labels)
    features = {}
    for name in FEATURES:
        values = frame[name].to_numpy(dtype=np.float64)
        inner = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]))
        edges = np.concatenate(([0.0], inner[(inner > 0) & (inner < 1)], [1.0]))
        counts, _ = np.histogram(values, bins=edges)
        q1, q3 = np.quantile(values, [0.25, 0.75])
        features[name] = FeatureReference(
            bins=[round(float(e), 6) for e in edges],
            weights=[float(c) / len(values) for c in counts],
            quartiles=(round(float(q1), 6), round(float(q3), 6)),
        )
    weights = np.bincount(labels, minlength=NUM_CLASSES)[:NUM_CLASSES] / len(labels)
    return DriftReference(label_weights=[float(w) for w in weights], features=features)


def drift_expectations(ref: DriftReference) -> list[Expectation]:
    """What a batch must satisfy to count as drawn from the same distribution as the training data."""
    import great_expectations.expectations as gxe

    expectations: list[Expectation] = [
        # Class proportions: a batch of one class (or a few) would tilt the model towards them.
        gxe.ExpectColumnKLDivergenceToBeLessThan(
            column="label",
            partition_object={"values": list(range(NUM_CLASSES)), "weights": ref.label_weights},
            threshold=KL_THRESHOLD,
        )
    ]
    for name, feature in ref.features.items():
        expectations += [
            # The whole distribution of the summary: inverted or washed-out images move it far.
            gxe.ExpectColumnKLDivergenceToBeLessThan(
                column=name,
                partition_object={"bins": feature.bins, "weights": feature.weights},
                threshold=KL_THRESHOLD,
            ),
            # Its middle: the typical image of the batch is a typical training image.
            gxe.ExpectColumnMedianToBeBetween(
                column=name, min_value=feature.quartiles[0], max_value=feature.quartiles[1]
            ),
        ]
    return expectations
