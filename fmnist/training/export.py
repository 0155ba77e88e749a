"""The TensorFlow SavedModel of a trained model: what TF Serving, KServe or any TensorFlow runtime loads.

Its `serving_default` signature takes `images`, a batch of raw 28x28 images as uint8 (n, 28, 28), and
returns `probabilities`, float32 (n, 10). The scaling to [0, 1] is inside it, the same float32
division as `fmnist.data.cache.normalize`, so no client needs to know it or can drift from training.

The export is written as TF Serving reads a model's base path, one numbered folder per version:
`saved_model/1/` in a run's folder and in each registry version.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmnist.data.dataset import IMAGE_SIZE

if TYPE_CHECKING:
    import keras

SIGNATURE = "serving_default"
INPUT = "images"
OUTPUT = "probabilities"
SERVING_VERSION = "1"  # the numbered folder TF Serving finds under the model's base path
MAX_DIFFERENCE = 1e-5  # between the export's and the Keras model's probabilities on the same images


class ExportError(RuntimeError):
    """The SavedModel does not reproduce the Keras model's predictions."""


def export_saved_model(model: keras.Model, out_dir: Path) -> None:
    """Write `model` as a SavedModel with a uint8 `serving_default` into `out_dir` (replaced whole)."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.cast(images, tf.float32) / tf.constant(255, tf.float32)
        return {OUTPUT: tf.cast(model(pixels, training=False), tf.float32)}

    spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE], tf.uint8, name=INPUT)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[spec])
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    archive.write_out(str(staging), verbose=False)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


def saved_model_predictions(folder: Path, images: np.ndarray) -> np.ndarray:
    """The probabilities the SavedModel in `folder` gives the uint8 `images`, through `serving_default`."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder)).signatures[SIGNATURE]
    return serve(**{INPUT: tf.constant(images, tf.uint8)})[OUTPUT].numpy()


def check_export(folder: Path, images: np.ndarray, expected: np.ndarray) -> float:
    """Raise `ExportError` unless the export gives `expected` for `images` (uint8) within `MAX_DIFFERENCE`."""
    difference = float(np.abs(saved_model_predictions(folder, images) - expected).max())
    if not difference <= MAX_DIFFERENCE:
        raise ExportError(
            f"{folder}: the SavedModel's probabilities differ from the Keras model's by up to {difference:.2e} "
            f"on {len(images)} test images (at most {MAX_DIFFERENCE:g} allowed); not registering it"
        )
    return difference


def files_of(folder: Path) -> list[str]:
    """The export's files, relative to `folder`, in a stable order."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
