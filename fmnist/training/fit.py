"""Train stage: fit the model on the cached parquet data, on the GPUs this worker sees, or the CPU.

Throughput choices that leave the recipe's results unchanged: float32 arrays straight from the
cache (the tutorials pass float64), several batches per compiled call (`steps_per_execution`), no
per-step progress bar, and XLA only on GPUs (on CPUs it measured several times slower).

A run's folder holds the Keras `BackupAndRestore` state, so a retried run resumes after its last
completed epoch; `history.json` is written at every epoch end and survives the interruption. With
the registry on S3 the folder's checkpoints are uploaded after every epoch (`fmnist.training.run_folder`), so
the run resumes on whichever host starts it again.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydantic import TypeAdapter

from fmnist.data.cache import CachedDataset, normalize, read_pixels
from fmnist.data.dataset import NUM_CLASSES
from fmnist.storage import StoredFile
from fmnist.storage.files import atomic_path
from fmnist.storage.layout import RunLayout
from fmnist.training import lineage
from fmnist.training.devices import plan_devices
from fmnist.training.model import TrainParams, build_model, compile_model, one_hot_labels
from fmnist.training.run_folder import RunFolder

if TYPE_CHECKING:
    from fmnist.training.epoch_log import EpochHook

log = logging.getLogger(__name__)


class ChanceLevelError(RuntimeError):
    """Training ended with a model no better than guessing."""


@dataclass(frozen=True)
class TrainResult:
    run: RunLayout  # the run's folder in the store
    model: StoredFile
    history: StoredFile
    device: str
    mixed_precision: bool
    host: dict  # the machine that trained (not the one that orchestrated), and its libraries
    libraries: dict
    epochs: int
    resumed_at_epoch: int  # 1-based epoch this call started at; 1 for a fresh run
    seconds_per_epoch: float  # mean over the epochs this call ran
    loss: float
    accuracy: float
    validation: ValidationSplit | None = None  # held out of the training data for model selection


@dataclass(frozen=True)
class ValidationSplit:
    """The training rows held out for early stopping (the test set never is), as the manifest records them."""

    fraction: float
    seed: int
    rows: int
    per_class: list[int]
    indices_sha256: str  # of the held-out row numbers (int64, sorted) in the cached training split

    @classmethod
    def of(cls, labels: np.ndarray, held_out: np.ndarray, params: TrainParams) -> ValidationSplit:
        per_class = np.bincount(labels[held_out], minlength=NUM_CLASSES).tolist()
        digest = hashlib.sha256(held_out.astype(np.int64).tobytes()).hexdigest()
        return cls(params.validation_fraction, params.seed, len(held_out), per_class, digest)


def check_not_at_chance(accuracy: float, loss: float, margin: float) -> None:
    chance = 1 / NUM_CLASSES
    if not math.isfinite(loss) or accuracy <= chance + margin:
        raise ChanceLevelError(
            f"the model is at chance level (training accuracy {accuracy:.4f}, loss {loss:.4f}; guessing gives "
            f"{chance:.2f} and {math.log(NUM_CLASSES):.4f}): it learned nothing. Check the input scaling "
            "(pixels must be divided by 255) and the learning rate; nothing was saved."
        )


def train_model(
    cached: CachedDataset,
    params: TrainParams,
    run: RunFolder,
    *,
    on_epoch: EpochHook | None = None,
    extra_callbacks: tuple = (),
    logger: logging.Logger | logging.LoggerAdapter = log,
) -> TrainResult:
    """Train `params.preset` on the cached training split; publish the model in the run folder."""
    import keras
    import tensorflow as tf

    from fmnist.training import fast_fit
    from fmnist.training.epoch_log import Backup, EpochLog

    plan = plan_devices(params)
    logger.info(
        "Training %s on %s%s", params.preset, plan.description, ", mixed precision" if plan.mixed_precision else ""
    )
    if (why_not := fast_fit.unsupported(params, plan)) is None:
        fast_fit.set_cpu_threads()
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(params.seed)
    keras.mixed_precision.set_global_policy("mixed_float16" if plan.mixed_precision else "float32")
    # uint8, a quarter of the float32 pixels: the fast path scales each batch as it takes it, Keras' fit
    # (below) gets float32 arrays, as the tutorials' recipe does.
    images, labels = read_pixels(run.store, cached.train)
    split, validation_data = None, None
    if params.validation_fraction:
        held_out = validation_indices(labels, params.validation_fraction, params.seed)
        split = ValidationSplit.of(labels, held_out, params)
        kept = np.setdiff1d(np.arange(len(labels)), held_out, assume_unique=True)
        validation_data = (scaled(images[held_out]), targets(labels[held_out], params))
        images, labels = images[kept], labels[kept]
        logger.info("Holding out %d training images (%g, by class) for model selection", split.rows, split.fraction)

    strategy = tf.distribute.MirroredStrategy() if plan.gpus > 1 else tf.distribute.get_strategy()
    with strategy.scope():
        model = build_model(params)
        steps_per_epoch = math.ceil(len(labels) / params.batch_size)
        compile_model(model, params, jit_compile=plan.jit_compile, steps_per_epoch=steps_per_epoch)

    if restored := run.restore():
        logger.info("Restored the checkpoint of epoch %d from %s", restored, run.location)
    epoch_log = EpochLog(run.local(RunLayout.HISTORY), params.epochs, on_epoch, logger)
    callbacks = [
        epoch_log,  # before the backup: an epoch is recorded before it counts as done
        # Two checkpoints: a process killed while writing one resumes from the other.
        Backup(run.backup_dir, logger),
        keras.callbacks.TensorBoard(str(run.local(RunLayout.TENSORBOARD)), write_graph=False, profile_batch=0),
        # After the backup is written: with the run folder in a bucket, the epoch is saved there.
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: run.save_epoch(epoch + 1)),
        *extra_callbacks,
    ]
    if params.early_stopping_patience:
        # Not in the first half: a schedule's best epochs come as the rate falls, after a plateau that
        # would stop it early (seed 0 stopped at epoch 22 of 35 at 0.8885, against 0.907 run to the end).
        # The best epoch's weights are kept in memory: a run resumed after a crash keeps the best since.
        callbacks.append(
            keras.callbacks.EarlyStopping(
                "val_accuracy",
                patience=params.early_stopping_patience,
                restore_best_weights=True,
                start_from_epoch=params.epochs // 2,
            )
        )
    if why_not is None and (why_not := fast_fit.unsupported_network(model)) is None:
        logger.info("Each epoch runs as one compiled graph with fused Adam (training.exact: Keras' fit)")
        fast_fit.fit(model, images, labels, params, callbacks)
    else:
        logger.info("Training with Keras' fit: %s", why_not)
        model.fit(
            scaled(images),
            targets(labels, params),
            batch_size=params.batch_size,
            epochs=params.epochs,
            shuffle=True,
            verbose=0,
            callbacks=callbacks,
            validation_data=validation_data,
        )
    run.push_logs()
    run.drop_checkpoints()
    final = epoch_log.history[-1]
    check_not_at_chance(final["accuracy"], final["loss"], params.chance_margin)
    with atomic_path(run.local(RunLayout.MODEL)) as tmp:
        model.save(tmp)
    return TrainResult(
        run=run.layout,
        model=run.publish(RunLayout.MODEL),
        history=run.publish(RunLayout.HISTORY),
        device=plan.description,
        mixed_precision=plan.mixed_precision,
        host=lineage.host(),
        libraries=lineage.library_versions(),
        epochs=len(epoch_log.history),
        resumed_at_epoch=epoch_log.ran[0] if epoch_log.ran else params.epochs + 1,
        seconds_per_epoch=sum(epoch_log.seconds) / max(len(epoch_log.seconds), 1),
        loss=final["loss"],
        accuracy=final["accuracy"],
        validation=split,
    )


def scaled(images: np.ndarray) -> np.ndarray:
    """(n, 28, 28) uint8 images as the float32 arrays Keras' fit takes: `normalize`d, in their shape."""
    return normalize(images).reshape(images.shape)


def validation_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows held out of training, sorted: `fraction` of each class, picked by a generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == label)
        picked.append(rng.permutation(rows)[: round(fraction * len(rows))])
    return np.sort(np.concatenate(picked))


def targets(labels: np.ndarray, params: TrainParams) -> np.ndarray:
    """What the loss compares the output with: class indices, or one-hot rows for label smoothing."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels] if one_hot_labels(params) else labels


def save_result(run: RunFolder, result: TrainResult) -> None:
    """Hand the result back through the run folder: the flow that waits for it may run on another host."""
    run.write_json(RunLayout.TRAIN_RESULT, asdict(result))


def load_result(run: RunFolder) -> TrainResult:
    return TypeAdapter(TrainResult).validate_python(run.read_json(RunLayout.TRAIN_RESULT))
