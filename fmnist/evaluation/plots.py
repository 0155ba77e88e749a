"""Evaluation plots as small PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

from fmnist.data.dataset import CLASS_NAMES
from fmnist.storage.files import atomic_path

DPI = 80  # keeps each PNG to tens of KB, small enough to embed in a Prefect artifact


def _save(figure: Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI, format="png")


def learning_curves(history: list[dict], test_accuracy: float, path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(8, 3))
    loss_ax, acc_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_ax.set(title="Training loss", xlabel="epoch")
    acc_ax.plot(epochs, [h["accuracy"] for h in history], marker="o", label="train")
    acc_ax.axhline(test_accuracy, color="tab:orange", linestyle="--", label=f"test {test_accuracy:.3f}")
    acc_ax.set(title="Accuracy", xlabel="epoch")
    acc_ax.legend()
    _save(figure, path)


def confusion_matrix_plot(matrix: np.ndarray, path: Path) -> None:
    figure = Figure(figsize=(6.5, 5.5))
    ax = figure.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    threshold = matrix.max() / 2
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, count, ha="center", va="center", fontsize=7, color="white" if count > threshold else "black")
    _save(figure, path)


def sample_predictions(images: np.ndarray, true: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    """A grid of test images titled 'predicted (true)', wrong ones in red."""
    columns = 6
    rows = int(np.ceil(len(images) / columns))
    figure = Figure(figsize=(columns * 1.3, rows * 1.5))
    axes = figure.subplots(rows, columns)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, t, p in zip(np.ravel(axes), images, true, predicted, strict=False):
        ax.imshow(image, cmap="gray_r")
        ax.set_title(f"{CLASS_NAMES[p]}\n({CLASS_NAMES[t]})", fontsize=7, color="black" if t == p else "red")
    _save(figure, path)
