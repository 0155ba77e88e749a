"""The reference tutorial's script, as written: its DNN, `fit` on the arrays divided by 255.0.

The one change: the arrays come from the local IDX files instead of
`keras.datasets.fashion_mnist.load_data()`, which needs the network (same uint8 arrays). A timing
callback measures each epoch; it does not change the training. Prints one JSON line.

    .venv/bin/python bench/plain_tutorial.py --seed 42 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import tensorflow as tf

from fmnist.data import idx

MIRROR = Path("/usr/share/datasets/fashion-mnist")


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)

    train_images, train_labels = idx.read_pair(
        MIRROR / "train-images-idx3-ubyte.gz", MIRROR / "train-labels-idx1-ubyte.gz"
    )
    test_images, test_labels = idx.read_pair(MIRROR / "t10k-images-idx3-ubyte.gz", MIRROR / "t10k-labels-idx1-ubyte.gz")
    train_images = train_images / 255.0
    test_images = test_images / 255.0

    model = tf.keras.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(28, 28)),
            tf.keras.layers.Dense(512, activation="relu"),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dropout(0.2),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = EpochTimer()
    model.fit(train_images, train_labels, epochs=args.epochs, batch_size=64, callbacks=[timer])
    test_loss, test_acc = model.evaluate(test_images, test_labels)
    print(json.dumps({"epoch_s": timer.seconds, "test_accuracy": float(test_acc), "test_loss": float(test_loss)}))


if __name__ == "__main__":
    main()
