"""The model code on a GPU, on any Keras backend: each preset, float32 and mixed precision.

The pipeline trains with TensorFlow; this check needs only Keras, so it also runs where only JAX is
installed (`KERAS_BACKEND=jax`). It trains each preset for two epochs on generated images
(XLA on, as the pipeline does on GPUs; slow on a CPU) and prints images per second of the second epoch, the final
training accuracy and the output dtype, then one JSON line.

    KERAS_BACKEND=jax python bench/model_on_gpu.py [--images 60000]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import keras
import numpy as np

from fmnist.training.epoch_log import EpochLog
from fmnist.training.model import TrainParams, build_model, compile_model
from tests.helpers import balanced_labels, synthetic_images


def accelerator() -> str:
    if keras.backend.backend() == "jax":
        import jax

        return ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices())
    import tensorflow as tf

    return ", ".join(d.name for d in tf.config.list_physical_devices("GPU")) or "no GPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60_000, help="generated training images (a multiple of 10)")
    args = parser.parse_args()
    labels = balanced_labels(args.images // 10, seed=0)
    images = synthetic_images(labels, seed=0).astype(np.float32) / np.float32(255)
    results = []
    print(f"backend {keras.backend.backend()}, devices: {accelerator()}")
    for preset in ("dnn", "mlp128", "cnn"):
        for policy in ("float32", "mixed_float16"):
            keras.mixed_precision.set_global_policy(policy)
            params = TrainParams(preset=preset, epochs=2)
            keras.utils.set_random_seed(params.seed)
            model = build_model(params)
            compile_model(model, params, jit_compile=True)
            with tempfile.TemporaryDirectory() as tmp:
                timer = EpochLog(Path(tmp) / "history.json", params.epochs, None, logging.getLogger(__name__))
                history = model.fit(
                    images, labels, batch_size=params.batch_size, epochs=params.epochs, verbose=0, callbacks=[timer]
                )
            row = {
                "preset": preset,
                "policy": policy,
                "hidden_dtype": model.layers[1].compute_dtype,
                "output_dtype": model.layers[-1].compute_dtype,
                "images_per_s": len(images) / timer.seconds[-1],
                "first_epoch_s": timer.seconds[0],
                "accuracy": float(history.history["accuracy"][-1]),
            }
            results.append(row)
            print(
                f"{preset:7} {policy:14} {row['images_per_s']:>10.0f} images/s"
                f"  first epoch {row['first_epoch_s']:.1f} s"
                f"  accuracy {row['accuracy']:.4f}  output {row['output_dtype']}"
            )
    keras.mixed_precision.set_global_policy("float32")
    print(
        json.dumps(
            {"bench": "model_on_gpu", "backend": keras.backend.backend(), "devices": accelerator(), "runs": results}
        )
    )


if __name__ == "__main__":
    main()
