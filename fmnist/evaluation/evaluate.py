"""Evaluate stage: the trained model on the fixed test set (and the training set, for the gap), with
per-class metrics, the confusion matrix and plots, published in the run folder; and what the rollout's
judge and the drift monitor need of the test set (the label-free estimates' calibration, each image's class)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fmnist.data.cache import CachedDataset, CachedPart, iter_part, pixels_of, read_part, verified_path
from fmnist.data.dataset import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from fmnist.evaluation import plots
from fmnist.evaluation.estimates import Calibration, fit_calibration
from fmnist.storage import Store, StoredFile
from fmnist.storage.files import atomic_write_bytes, atomic_write_text
from fmnist.storage.layout import RunLayout
from fmnist.training.export import SERVING_VERSION, check_export, export_saved_model, files_of
from fmnist.training.fit import TrainResult
from fmnist.training.model import load_verified_model
from fmnist.training.run_folder import RunFolder

if TYPE_CHECKING:
    from pathlib import Path

    import keras

PLOTS = ("learning_curves", "confusion_matrix", "sample_predictions")

SAMPLE_IMAGES = 24
PREDICT_ROWS = 4096  # images per forward pass: few calls, and a cnn's activations stay under half a GB
EXPORT_CHECK_IMAGES = 1000  # test images the SavedModel must score as the Keras model does


@dataclass(frozen=True)
class Evaluation:
    test_accuracy: float
    test_loss: float
    train_accuracy: float
    train_loss: float
    train_test_gap: float  # train accuracy minus test accuracy: how much the model overfits
    per_class: list[dict]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    model_sha256: str  # of the model these numbers are about: registration keeps only that one
    metrics: StoredFile  # metrics.json in the run folder
    plots: dict[str, StoredFile]  # each plot's PNG in the run folder
    saved_model: dict[str, StoredFile]  # the checked SavedModel's files, by their name in the run folder
    # For the rollout's judge and the drift monitor (None only where an evaluation is made by hand): the
    # label-free estimates' calibration on the test set, and each test image's predicted class.
    calibration: Calibration | None = None
    test_predictions: StoredFile | None = None  # evaluation/test_predictions.npy, uint8


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, classes: int = NUM_CLASSES) -> np.ndarray:
    return np.bincount(true.astype(np.int64) * classes + predicted, minlength=classes * classes).reshape(
        classes, classes
    )


def per_class_metrics(matrix: np.ndarray) -> list[dict]:
    """Precision, recall and F1 of each class from a confusion matrix (0 where undefined)."""
    hits = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return [
        {
            "class": CLASS_NAMES[i],
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(actual[i]),
        }
        for i in range(len(matrix))
    ]


def losses_and_hits(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each image's cross-entropy against its class index, as Keras computes it (probabilities clipped to
    [1e-7, 1 - 1e-7]), and whether its top class is right; the same for every recipe, whatever loss it
    trained with (label smoothing, say)."""
    picked = probabilities[np.arange(len(labels)), labels.astype(np.int64)]
    return -np.log(np.clip(picked, 1e-7, 1 - 1e-7)), probabilities.argmax(axis=1) == labels


def loss_and_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    losses, hits = losses_and_hits(probabilities, labels)
    return float(losses.mean()), float(hits.mean())


def streamed_loss_and_accuracy(model: keras.Model, store: Store, parts: list[CachedPart]) -> tuple[float, float]:
    """`loss_and_accuracy` over the parts' images, a row group at a time: a training set of any size is
    never held whole."""
    loss_sum, hit_count, rows = 0.0, 0, 0
    for part in parts:
        for pixels, labels in iter_part(verified_path(store, part)):
            probabilities = predicted_probabilities(model, pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
            losses, hits = losses_and_hits(probabilities, labels)
            loss_sum, hit_count, rows = (
                loss_sum + losses.sum(dtype=np.float64),
                hit_count + hits.sum(),
                rows + len(hits),
            )
    return loss_sum / rows, hit_count / rows


def predicted_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The model's probabilities for `images`: `predict`'s forward pass, without the tf.data pipeline it
    builds for each call, which copied the images and took 3-5x the arithmetic's time (1.7 s against 0.35 s
    for the 70,000 images and the dnn)."""
    return np.concatenate(
        [model.predict_on_batch(images[start : start + PREDICT_ROWS]) for start in range(0, len(images), PREDICT_ROWS)]
    )


def evaluate_model(trained: TrainResult, cached: CachedDataset, run: RunFolder) -> Evaluation:
    """Metrics and plots of the trained model, published in the run folder's `evaluation/`."""
    store = run.store
    model = load_verified_model(store, trained.model)
    test_images, test_labels = read_part(verified_path(store, cached.test))
    probabilities = predicted_probabilities(model, test_images)
    test_loss, test_accuracy = loss_and_accuracy(probabilities, test_labels)
    train_loss, train_accuracy = streamed_loss_and_accuracy(model, store, cached.train)
    predicted = probabilities.argmax(axis=1)
    matrix = confusion_matrix(test_labels, predicted)
    saved_model = export_checked(model, run, test_images[:EXPORT_CHECK_IMAGES], probabilities[:EXPORT_CHECK_IMAGES])

    history = json.loads(store.local_copy(trained.history).read_text())["epochs"]
    out_dir = run.local(RunLayout.EVALUATION)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots.learning_curves(history, float(test_accuracy), out_dir / "learning_curves.png")
    plots.confusion_matrix_plot(matrix, out_dir / "confusion_matrix.png")
    plots.sample_predictions(
        test_images[:SAMPLE_IMAGES],
        test_labels[:SAMPLE_IMAGES],
        predicted[:SAMPLE_IMAGES],
        out_dir / "sample_predictions.png",
    )
    metrics = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "train_accuracy": float(train_accuracy),
        "train_loss": float(train_loss),
        "train_test_gap": float(train_accuracy - test_accuracy),
        "per_class": per_class_metrics(matrix),
        "confusion_matrix": matrix.tolist(),
    }
    atomic_write_text(out_dir / RunLayout.METRICS, json.dumps(metrics, indent=1))
    write_test_predictions(predicted, out_dir / RunLayout.TEST_PREDICTIONS)
    return Evaluation(
        **metrics,
        model_sha256=trained.model.sha256,
        metrics=run.publish(RunLayout.EVALUATION, RunLayout.METRICS),
        plots={name: run.publish(RunLayout.EVALUATION, f"{name}.png") for name in PLOTS},
        saved_model=saved_model,
        calibration=fit_calibration(probabilities, test_labels),
        test_predictions=run.publish(RunLayout.EVALUATION, RunLayout.TEST_PREDICTIONS),
    )


def write_test_predictions(predicted: np.ndarray, path: Path) -> None:
    """Each test image's predicted class as a uint8 .npy file, written whole or not at all."""
    buffer = io.BytesIO()
    np.save(buffer, predicted.astype(np.uint8), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def export_checked(
    model: keras.Model, run: RunFolder, images: np.ndarray, expected: np.ndarray
) -> dict[str, StoredFile]:
    """The model's SavedModel (`fmnist.training.export`), published in the run folder once it gives `expected` for
    `images` (normalized test images, sent to it as the raw uint8 pixels they were made from)."""
    folder = run.local(RunLayout.SAVED_MODEL, SERVING_VERSION)
    export_saved_model(model, folder)
    check_export(folder, pixels_of(images), expected)
    return {
        f"{RunLayout.SAVED_MODEL}/{SERVING_VERSION}/{name}": run.publish(RunLayout.SAVED_MODEL, SERVING_VERSION, name)
        for name in files_of(folder)
    }
