"""Keras callbacks of a training run: each epoch recorded as it ends, and a backup that survives a
kill at any instant; imports Keras (and so TensorFlow)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import keras

from fmnist.storage.files import atomic_write_text

EpochHook = Callable[[int, int, dict], None]  # (epochs done, epochs in all, that epoch's metrics)


class EpochLog(keras.callbacks.Callback):
    """Per-epoch metrics and seconds into a JSON file (kept across resumes), a log line, a hook."""

    def __init__(
        self, path: Path, epochs: int, hook: EpochHook | None, logger: logging.Logger | logging.LoggerAdapter
    ) -> None:
        super().__init__()
        self.path, self.epochs, self.hook, self.logger = path, epochs, hook, logger
        self.history: list[dict] = json.loads(path.read_text())["epochs"] if path.is_file() else []
        self.ran: list[int] = []  # 1-based epochs run by this process
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()
        if not self.ran and epoch > 0:
            self.logger.info("Resuming from the backup at epoch %d of %d", epoch + 1, self.epochs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self.started
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        # An epoch that ran again after a crash replaces its earlier record.
        self.history = [h for h in self.history if h["epoch"] <= epoch]
        self.history.append({"epoch": epoch + 1, "seconds": seconds, **metrics})
        atomic_write_text(self.path, json.dumps({"epochs": self.history}, indent=1))
        self.ran.append(epoch + 1)
        self.seconds.append(seconds)
        self.logger.info(
            "Epoch %d/%d: loss %.4f, accuracy %.4f (%.1f s)",
            epoch + 1,
            self.epochs,
            metrics.get("loss", math.nan),
            metrics.get("accuracy", math.nan),
            seconds,
        )
        if self.hook:
            self.hook(epoch + 1, self.epochs, metrics)


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' `BackupAndRestore` with two checkpoints, and a way out when the first one is torn.

    Keras falls back to the previous checkpoint when the latest cannot be read, but the first
    checkpoint has none before it: a process killed while writing it (a lost host, at the end of
    epoch 1) left a backup that made every later attempt fail. Then training starts over; the
    epochs it runs again replace their records in the history.
    """

    def __init__(self, backup_dir: Path, logger: logging.Logger | logging.LoggerAdapter) -> None:
        super().__init__(str(backup_dir), double_checkpoint=True)
        self.logger = logger

    def on_train_begin(self, logs: dict | None = None) -> None:
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError, KeyError) as exc:  # h5 cannot be opened; metadata torn
            self.logger.warning(
                "The backup in %s is torn (%s), with no copy to fall back on: starting over", self.backup_dir, exc
            )
            backup = (self._weights_path, self._training_metadata_path, self._prev_weights_path)
            for path in (*backup, self._prev_training_metadata_path):
                Path(path).unlink(missing_ok=True)
