"""Training on small generated data: it learns, refuses chance, resumes after a kill, reproduces."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from fmnist.data.cache import CachedDataset, read_part
from fmnist.storage import IntegrityError, Store
from fmnist.storage.layout import RunLayout
from fmnist.training.devices import NoGpuError, plan_devices
from fmnist.training.fit import ChanceLevelError, train_model, validation_indices
from fmnist.training.model import TrainParams, build_model, load_verified_model
from fmnist.training.run_folder import RunFolder
from tests.helpers import cached_dataset, learnable_cache, local_run

pytestmark = pytest.mark.training

ONE_EPOCH = TrainParams(epochs=1, seed=7)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> CachedDataset:
    return learnable_cache(tmp_path_factory.mktemp("cache"))


def test_one_epoch_learns_clearly_above_chance(cached: CachedDataset, tmp_path: Path) -> None:
    result = train_model(cached, ONE_EPOCH, local_run(tmp_path / "run"))
    assert result.accuracy > 0.5 and result.epochs == 1 and result.resumed_at_epoch == 1
    assert not result.mixed_precision and result.host["cpus"] and result.libraries["keras"]
    history = json.loads(Path(result.history.location).read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1] and history[0]["accuracy"] == pytest.approx(result.accuracy)
    assert Path(result.model.location) == tmp_path / "run" / "model.keras"
    assert Store().sha256(result.model.location) == result.model.sha256
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "backup").exists()  # removed once training finished


def test_chance_level_guard_refuses_a_model_that_learned_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=500).astype(np.uint8)  # no relation to the images
    cache = cached_dataset(tmp_path / "cache", (noise, labels), (noise[:50], labels[:50]))
    with pytest.raises(ChanceLevelError, match=r"at chance level \(training accuracy 0\.\d+, loss 2\.\d+"):
        train_model(cache, ONE_EPOCH, local_run(tmp_path / "run"))
    assert not (tmp_path / "run" / "model.keras").exists()


# Run in a separate process and SIGKILLed right after epoch 1 is backed up: a worker that dies.
KILLED_AFTER_FIRST_EPOCH = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import keras
    from pydantic import TypeAdapter
    from fmnist.data.cache import CachedDataset, read_part
    from fmnist.storage.layout import RunLayout
    from fmnist.training.model import TrainParams
    from fmnist.training.run_folder import RunFolder
    from fmnist.storage import Store
    from fmnist.training.fit import train_model

    class KillAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up code runs

    cached = TypeAdapter(CachedDataset).validate_json(sys.argv[1])
    run = RunFolder(Store(scratch=Path(sys.argv[3])), RunLayout(sys.argv[2]))
    train_model(cached, TrainParams(epochs=3, seed=7), run, extra_callbacks=(KillAfterFirstEpoch(),))
    """
)


def kill_after_first_epoch(cached: CachedDataset, run_dir: str, scratch: Path) -> None:
    """Train in another process that is SIGKILLed as soon as its first epoch is saved."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_FIRST_EPOCH, json.dumps(asdict(cached)), run_dir, str(scratch)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def test_killed_training_resumes_at_the_next_epoch(cached: CachedDataset, tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "run"
    kill_after_first_epoch(cached, str(run_dir), tmp_path / "scratch")
    assert [h["epoch"] for h in json.loads((run_dir / "history.json").read_text())["epochs"]] == [1]
    assert (run_dir / "backup").is_dir() and not (run_dir / "model.keras").exists()

    with caplog.at_level(logging.INFO):
        result = train_model(cached, TrainParams(epochs=3, seed=7), local_run(run_dir))
    assert result.resumed_at_epoch == 2 and result.epochs == 3
    assert [h["epoch"] for h in json.loads(Path(result.history.location).read_text())["epochs"]] == [1, 2, 3]
    assert "Resuming from the backup at epoch 2 of 3" in caplog.text
    assert [m for m in caplog.messages if m.startswith("Epoch ")] == [
        m for m in caplog.messages if m.startswith(("Epoch 2/3", "Epoch 3/3"))
    ]


def test_a_first_checkpoint_torn_by_the_kill_starts_over(cached: CachedDataset, tmp_path: Path, caplog) -> None:
    """The process died while writing the first checkpoint, which has no earlier copy to fall back on."""
    run_dir = tmp_path / "run"
    kill_after_first_epoch(cached, str(run_dir), tmp_path / "scratch")
    weights = run_dir / "backup" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])  # torn mid-write
    (run_dir / "backup" / "latest.weights.h5.bkp").unlink(missing_ok=True)

    with caplog.at_level(logging.INFO):
        result = train_model(cached, TrainParams(epochs=3, seed=7), local_run(run_dir))
    assert result.resumed_at_epoch == 1 and result.epochs == 3
    assert [h["epoch"] for h in json.loads(Path(result.history.location).read_text())["epochs"]] == [1, 2, 3]
    assert any("is torn" in m and "starting over" in m for m in caplog.messages)


def test_a_replacement_host_resumes_from_the_bucket(tmp_path: Path, bucket: str, caplog) -> None:
    """The run folder in S3: a host killed after epoch 1, another host (no shared disk) finishes the run."""
    cached = learnable_cache(f"{bucket}/cache", store=Store(scratch=tmp_path / "orchestrator"))
    run_dir = f"{bucket}/artifacts/runs/run-1"
    kill_after_first_epoch(cached, run_dir, tmp_path / "first-host")
    store = Store(scratch=tmp_path / "replacement-host")
    assert store.listdir(f"{run_dir}/backup") == ["epoch-00001"]
    assert [h["epoch"] for h in store.read_json(f"{run_dir}/history.json")["epochs"]] == [1]

    with caplog.at_level(logging.INFO):
        result = train_model(cached, TrainParams(epochs=3, seed=7), RunFolder(store, RunLayout(run_dir)))
    assert "Restored the checkpoint of epoch 1 from " + run_dir in caplog.text
    assert result.resumed_at_epoch == 2 and result.epochs == 3
    assert (
        result.model.location == f"{run_dir}/model.keras" and store.sha256(result.model.location) == result.model.sha256
    )
    assert [h["epoch"] for h in store.read_json(result.history.location)["epochs"]] == [1, 2, 3]
    assert store.listdir(f"{run_dir}/backup") == []  # snapshots go once training is over
    assert any(name.startswith("events.out.tfevents") for name in store.listdir(f"{run_dir}/tensorboard/train"))
    assert result.accuracy > 0.5


def test_same_seed_and_data_give_the_same_metrics(cached: CachedDataset, tmp_path: Path) -> None:
    first = train_model(cached, ONE_EPOCH, local_run(tmp_path / "a"))
    second = train_model(cached, ONE_EPOCH, local_run(tmp_path / "b"))
    other_seed = train_model(cached, TrainParams(epochs=1, seed=8), local_run(tmp_path / "c"))
    assert (first.loss, first.accuracy) == (second.loss, second.accuracy)
    assert other_seed.loss != first.loss


def test_require_gpu_fails_at_once_without_one(cached: CachedDataset, tmp_path: Path) -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU, so a run that requires one must not fail here")
    with pytest.raises(NoGpuError, match="require_gpu is set, but TensorFlow sees no GPU"):
        train_model(cached, TrainParams(require_gpu=True), local_run(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_presets_build_the_tutorial_networks() -> None:
    dnn = build_model(TrainParams())
    assert [
        (type(layer).__name__, getattr(layer, "units", None) or getattr(layer, "rate", None)) for layer in dnn.layers
    ] == [
        ("Flatten", None),
        ("Dense", 512),
        ("Dropout", 0.2),
        ("Dense", 128),
        ("Dropout", 0.2),
        ("Dense", 10),
    ]
    assert dnn.count_params() == 784 * 512 + 512 + 512 * 128 + 128 + 128 * 10 + 10
    assert build_model(TrainParams(preset="mlp128")).count_params() == 784 * 128 + 128 + 128 * 10 + 10
    cnn = build_model(TrainParams(preset="cnn"))
    kinds = [type(layer).__name__ for layer in cnn.layers]
    assert kinds[1:3] == ["RandomTranslation", "RandomFlip"]  # augmentation first; Keras skips it in inference
    counts = {kind: kinds.count(kind) for kind in ("Conv2D", "BatchNormalization", "MaxPooling2D", "Dropout", "Dense")}
    assert counts == {"Conv2D": 3, "BatchNormalization": 4, "MaxPooling2D": 2, "Dropout": 2, "Dense": 2}
    assert TrainParams(preset="cnn").validation_fraction == 0.1  # its recipe selects on held-out training rows
    for model in (dnn, cnn):
        assert model.output_shape == (None, 10)


def test_the_tuned_preset_brings_its_recipe_and_can_be_overridden() -> None:
    tuned = TrainParams(preset="dnn-tuned")
    assert (tuned.epochs, tuned.batch_size, tuned.validation_fraction, tuned.schedule) == (35, 128, 0.1, "cosine")
    assert TrainParams(preset="dnn-tuned", epochs=3).epochs == 3
    assert TrainParams().validation_fraction == 0 and TrainParams().schedule == "constant"  # the tutorial's
    with pytest.raises(ValueError, match="early_stopping_patience needs a validation_fraction"):
        TrainParams(early_stopping_patience=3)
    model = build_model(tuned)
    dense = [layer.units for layer in model.layers if type(layer).__name__ == "Dense"]
    norms = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    assert dense == [1024, 512, 10] and len(norms) == 2
    assert not [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]  # a plain MLP


def test_the_tuned_preset_selects_on_held_out_training_rows(cached: CachedDataset, tmp_path: Path) -> None:
    params = TrainParams(preset="dnn-tuned", epochs=2, batch_size=32, early_stopping_patience=1)
    result = train_model(cached, params, local_run(tmp_path / "run"))
    split = result.validation
    _, labels = read_part(Path(cached.train[0].file.location))
    held_out = validation_indices(labels, 0.1, params.seed)
    assert split.rows == len(held_out) == round(0.1 * cached.train_rows)
    assert split.per_class == np.bincount(labels[held_out], minlength=10).tolist()  # stratified
    assert len(set(split.per_class)) == 1  # a balanced split stays balanced
    assert split.indices_sha256 == hashlib.sha256(held_out.astype(np.int64).tobytes()).hexdigest()
    assert not np.array_equal(held_out, validation_indices(labels, 0.1, params.seed + 1))  # seeded
    history = json.loads(Path(result.history.location).read_text())["epochs"]
    assert all("val_accuracy" in epoch for epoch in history)
    assert load_verified_model(Store(), result.model).count_params() == build_model(params).count_params()


def test_mixed_precision_keeps_a_float32_output() -> None:
    import keras

    plan = plan_devices(TrainParams(mixed_precision="on"))
    # XLA only where there is a GPU to compile for (it is 5x slower on CPUs): true on either kind of worker.
    assert plan.mixed_precision and plan.jit_compile == (plan.gpus > 0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(TrainParams())
        assert model.layers[1].compute_dtype == "float16"
        assert model.layers[-1].compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_default_preset_starts_from_the_tutorials_exact_weights() -> None:
    """Same seed, same initial weights as the tutorial's own Sequential: the recipe is unchanged."""
    import keras

    keras.utils.set_random_seed(42)
    ours = build_model(TrainParams()).get_weights()
    keras.utils.set_random_seed(42)
    tutorial = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    assert len(ours) == len(tutorial.get_weights()) == 6
    for mine, theirs in zip(ours, tutorial.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    dropout_seeds = [
        layer.seed_generator.state.numpy().tolist() for layer in tutorial.layers if "Dropout" in type(layer).__name__
    ]
    keras.utils.set_random_seed(42)
    model = build_model(TrainParams())
    assert [
        layer.seed_generator.state.numpy().tolist() for layer in model.layers if "Dropout" in type(layer).__name__
    ] == dropout_seeds


def test_training_reads_only_parquet_that_matches_the_cache_manifest(tmp_path: Path) -> None:
    cached = learnable_cache(tmp_path / "cache")
    parquet = Path(cached.train[0].path)
    parquet.write_bytes(parquet.read_bytes() + b" appended by someone")
    with pytest.raises(IntegrityError, match=rf"{parquet}: sha256 \w+ is not the recorded {cached.train[0].sha256}"):
        train_model(cached, ONE_EPOCH, local_run(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written
