"""The dense presets' fast path (`fmnist.training.fast_fit`): Keras' Adam step for step, which runs take it, and
the exact switch that keeps the tutorial's own `fit`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmnist.data.cache import read_part
from fmnist.storage import Store
from fmnist.training.devices import DevicePlan
from fmnist.training.fast_fit import fit, unsupported, unsupported_network
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams, build_model, compile_model
from tests.helpers import balanced_labels, learnable_cache, local_run, synthetic_images

pytestmark = pytest.mark.training

CPU = DevicePlan("CPU", 0, mixed_precision=False, jit_compile=False)


def compiled(params: TrainParams, hidden_units: int | None = None):
    """The preset's network compiled with its recipe; or, with `hidden_units`, one hidden layer that wide."""
    import keras

    keras.utils.set_random_seed(params.seed)
    if hidden_units is None:
        model = build_model(params)
    else:
        model = keras.Sequential(
            [
                keras.Input((28, 28)),
                keras.layers.Flatten(),
                keras.layers.Dense(hidden_units, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
    compile_model(model, params, jit_compile=False, steps_per_epoch=1)
    return model


@pytest.mark.parametrize(
    "hidden_units",
    [None, 385],
    ids=["dnn: 512 units in 4 blocks and 128 whole", "385 units in 3 uneven blocks"],
)
def test_an_epoch_graph_makes_kerass_adam_steps(hidden_units: int | None) -> None:
    """Without dropout and with one batch an epoch (so shuffling cannot matter), three epochs of the fast
    path give Keras' own weights, optimizer moments and logged metrics, to float rounding."""
    import keras

    labels = balanced_labels(12, seed=3)
    images = synthetic_images(labels, seed=3)  # uint8: the fast path scales each batch itself
    params = TrainParams(dropout=0.0, epochs=3, batch_size=len(labels), seed=5)
    reference, fast = compiled(params, hidden_units), compiled(params, hidden_units)
    history = reference.fit(
        images.astype(np.float32) / 255, labels, batch_size=len(labels), epochs=3, shuffle=False, verbose=0
    ).history
    logged = keras.callbacks.History()
    fit(fast, images, labels, params, [logged])

    assert int(fast.optimizer.iterations) == int(reference.optimizer.iterations) == 3
    for ours, keras_own in zip(fast.optimizer.variables, reference.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(keras_own), rtol=1e-4, atol=1e-6, err_msg=ours.path)
    for ours, keras_own in zip(fast.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(ours, keras_own, rtol=1e-4, atol=1e-6)
    assert logged.history["loss"] == pytest.approx(history["loss"], rel=1e-5)
    assert logged.history["accuracy"] == pytest.approx(history["accuracy"])
    assert history["loss"][-1] < history["loss"][0]  # the steps did something


def test_an_epoch_starts_from_the_keras_state_and_leaves_its_own_there() -> None:
    """A wide layer trains as blocks of its own variables; between epochs the Keras variables must hold
    the state: a run stopped after epoch 1 and resumed in a fresh model (as `BackupAndRestore` does)
    ends where the unbroken run ends."""
    labels = balanced_labels(30, seed=4)  # 300 images: 4 batches of 64 and one of 44 an epoch
    images = synthetic_images(labels, seed=4)
    params = TrainParams(epochs=2, batch_size=64, seed=9)  # the dnn: 512 units, so 4 blocks, and dropout
    unbroken, first_half, resumed = compiled(params), compiled(params), compiled(params)
    fit(unbroken, images, labels, params, [])
    fit(first_half, images, labels, params.model_copy(update={"epochs": 1}), [])

    resumed.set_weights(first_half.get_weights())
    resumed.optimizer.build(resumed.trainable_variables)
    for target, source in zip(resumed.optimizer.variables, first_half.optimizer.variables, strict=True):
        target.assign(source)
    resumed._initial_epoch = 1  # where BackupAndRestore leaves a model it restored after epoch 1
    fit(resumed, images, labels, params, [])

    assert int(resumed.optimizer.iterations) == int(unbroken.optimizer.iterations) == 2 * 5
    for ours, theirs in zip(resumed.optimizer.variables, unbroken.optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7, err_msg=ours.path)
    for ours, theirs, before in zip(
        resumed.get_weights(), unbroken.get_weights(), first_half.get_weights(), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
        assert not np.array_equal(ours, before)  # epoch 2 changed every variable


def test_which_runs_take_the_fast_path() -> None:
    import keras

    assert unsupported(TrainParams(), CPU) is None
    assert unsupported(TrainParams(exact=True), CPU) == "training.exact is set"
    gpu = DevicePlan("1 x GPU", 1, mixed_precision=False, jit_compile=True)
    assert "until it is checked on GPUs" in unsupported(TrainParams(), gpu)
    assert "validation split" in unsupported(TrainParams(preset="dnn-tuned"), CPU)
    assert unsupported_network(compiled(TrainParams())) is None
    assert unsupported_network(compiled(TrainParams(preset="mlp128"))) is None
    plain_adam_cnn = TrainParams(preset="cnn", weight_decay=0, schedule="constant")
    assert "not Flatten, Dense(relu)" in unsupported_network(compiled(plain_adam_cnn))
    assert "AdamW" in unsupported_network(compiled(TrainParams(preset="cnn")))
    tuned_network = compiled(TrainParams(preset="dnn-tuned", validation_fraction=0, early_stopping_patience=0))
    assert "AdamW" in unsupported_network(tuned_network)
    clipped = compiled(TrainParams())
    clipped.compile(optimizer=keras.optimizers.Adam(clipnorm=1.0), loss="sparse_categorical_crossentropy")
    assert "clipping" in unsupported_network(clipped)


def test_the_exact_switch_gives_the_tutorials_own_fit_bit_for_bit(tmp_path: Path) -> None:
    """`training.exact`: the pipeline's run is the tutorial script's `fit` on the same arrays, to the bit."""
    import keras

    cached = learnable_cache(tmp_path / "cache", train_per_class=20)
    params = TrainParams(exact=True, epochs=2, seed=11)
    result = train_model(cached, params, local_run(tmp_path / "run"))
    images, labels = read_part(Path(cached.train[0].path))

    keras.utils.set_random_seed(params.seed)  # the tutorial's script, as bench/plain_tutorial.py runs it
    tutorial = build_model(params)
    tutorial.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    tutorial.fit(images, labels, epochs=2, batch_size=64, verbose=0)
    trained = keras.models.load_model(Store().local_copy(result.model))
    for ours, theirs in zip(trained.get_weights(), tutorial.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_the_one_layer_preset_takes_the_fast_path_too(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="fmnist.training.fit")
    cached = learnable_cache(tmp_path / "cache")
    result = train_model(cached, TrainParams(preset="mlp128", epochs=1), local_run(tmp_path / "run"))
    assert result.accuracy > 0.5
    assert "Each epoch runs as one compiled graph" in caplog.text
