"""Training hyperparameters and the model built from them.

`build_model` uses only the Keras 3 API (no TensorFlow calls), so the same code runs on any Keras
backend; the pipeline runs it on TensorFlow (`tf.keras` is Keras 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fmnist.data.dataset import IMAGE_SIZE, NUM_CLASSES

if TYPE_CHECKING:
    import keras

    from fmnist.storage import Store, StoredFile

Preset = Literal["dnn", "dnn-tuned", "mlp128", "cnn"]
# What a preset changes from the defaults when the parameters do not say: `dnn` is the tutorial's recipe.
RECIPES: dict[str, dict[str, object]] = {
    "dnn-tuned": {
        "epochs": 35,
        "batch_size": 128,
        "dropout": 0.3,
        "validation_fraction": 0.1,
        "early_stopping_patience": 8,
        "label_smoothing": 0.1,
        "weight_decay": 1e-4,
        "schedule": "cosine",
    },
    # 26 epochs of about 28 s on 2 CPU cores: 12-13 minutes, under the 15 the preset is allowed.
    "cnn": {
        "epochs": 26,
        "batch_size": 128,
        "dropout": 0.2,
        "validation_fraction": 0.1,
        "early_stopping_patience": 6,
        "label_smoothing": 0.1,
        "weight_decay": 1e-4,
        "schedule": "cosine",
    },
}
# The cnn preset's augmentation: shifts of up to 2 pixels each way, and mirror images (a left shoe
# mirrored is a right shoe; no class of Fashion-MNIST changes under a horizontal flip).
SHIFT_PIXELS = 2


class TrainParams(BaseModel):
    """Every knob of a training run. The defaults are the reference tutorials' DNN recipe."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a misspelt knob is an error, not the default

    preset: Preset = Field(
        "dnn",
        description="dnn: the tutorial's 512-128 DNN; dnn-tuned: a 1024-512 MLP with batch normalization; "
        "mlp128: one hidden layer of 128; cnn: 3 batch-normalized conv layers with augmentation (shifts, flips). "
        "dnn-tuned and cnn bring their own recipe (RECIPES) for the knobs not set",
    )
    epochs: int = Field(5, ge=1, le=1000)
    batch_size: int = Field(64, ge=1, le=65536)
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam")
    dropout: float = Field(0.2, ge=0, lt=1, description="After each hidden layer that has dropout")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Same seed, data and machine: same metrics")
    steps_per_execution: int = Field(
        64, ge=1, le=10000, description="Batches per compiled call; a throughput setting, not a recipe change"
    )
    exact: bool = Field(
        False,
        description="Train with Keras' fit, as the tutorial does: a seed then gives its run bit for bit. Off: "
        "the dense presets train on CPUs as one compiled graph per epoch with fused Adam (same recipe and "
        "math, about 3.7x faster on 2 cores, other random draws)",
    )
    require_gpu: bool = Field(False, description="Fail at once if this worker sees no GPU")
    mixed_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: float16 compute on GPUs with tensor cores (compute capability 7.0+)"
    )
    deterministic: bool = Field(
        False, description="TF op determinism: bit-identical GPU runs, slower (CPU runs are reproducible anyway)"
    )
    chance_margin: float = Field(
        0.1, ge=0, le=0.9, description="Refuse a model whose training accuracy is within this of chance (1/10)"
    )
    validation_fraction: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Held out of the training data (stratified by class, seeded) for early stopping; never the "
        "test set. 0: train on all of it",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        le=1000,
        description="From half-way, stop after this many epochs without a better validation accuracy, keeping "
        "the best epoch's weights; 0: off",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay (AdamW) when above 0")
    schedule: Literal["constant", "cosine"] = Field("constant", description="Learning rate over the run")

    @model_validator(mode="before")
    @classmethod
    def _recipe(cls, data: Any) -> Any:
        """A preset's recipe fills what the parameters leave out."""
        if isinstance(data, dict) and (recipe := RECIPES.get(data.get("preset", ""))):
            return {**recipe, **data}
        return data

    @model_validator(mode="after")
    def _needs_validation(self) -> TrainParams:
        if self.early_stopping_patience and not self.validation_fraction:
            raise ValueError("early_stopping_patience needs a validation_fraction above 0 to judge by")
        return self


def build_model(params: TrainParams) -> keras.Model:
    """The preset's network: (28, 28) float inputs in [0, 1], softmax over the 10 classes."""
    import keras
    from keras import layers

    # Layers are made in network order: each draws its seed from the global generator as it is made,
    # so this order is what makes a seed give the tutorials' exact weights and dropout masks.
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE), name="image")
    hidden = NETWORKS[params.preset](params)
    # The output stays float32 under mixed precision: a float16 softmax loses the small probabilities.
    output = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")
    return keras.Sequential([inputs, *hidden, output], name=params.preset)


def _dnn(params: TrainParams) -> list:
    from keras import layers

    return [
        layers.Flatten(),
        layers.Dense(512, activation="relu"),
        layers.Dropout(params.dropout),
        layers.Dense(128, activation="relu"),
        layers.Dropout(params.dropout),
    ]


def _dnn_tuned(params: TrainParams) -> list:
    from keras import layers

    hidden = [layers.Flatten()]
    for width in (1024, 512):  # batch normalization makes the bias redundant
        hidden += [
            layers.Dense(width, use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Dropout(params.dropout),
        ]
    return hidden


def _mlp128(params: TrainParams) -> list:
    from keras import layers

    return [layers.Flatten(), layers.Dense(128, activation="relu")]


def _cnn(params: TrainParams) -> list:
    """Augmentation (active in training only), then 32 and 2 x 64 3x3 filters, batch-normalized."""
    from keras import layers

    shift = SHIFT_PIXELS / IMAGE_SIZE
    return [
        layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1)),
        layers.RandomTranslation(shift, shift, fill_mode="constant"),
        layers.RandomFlip("horizontal"),
        *_conv_bn_relu(32),
        layers.MaxPooling2D(2),
        *_conv_bn_relu(64),
        *_conv_bn_relu(64),
        layers.MaxPooling2D(2),
        layers.Dropout(params.dropout),
        layers.Flatten(),
        layers.Dense(256, use_bias=False),
        layers.BatchNormalization(),
        layers.ReLU(),
        layers.Dropout(params.dropout),
    ]


# Each preset's hidden layers, by name: a preset without its own network is caught by a test, not built as another.
NETWORKS: dict[str, Callable[[TrainParams], list]] = {
    "dnn": _dnn,
    "dnn-tuned": _dnn_tuned,
    "mlp128": _mlp128,
    "cnn": _cnn,
}


def _conv_bn_relu(filters: int) -> list:
    from keras import layers

    # Batch normalization makes the convolution's bias redundant.
    return [layers.Conv2D(filters, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU()]


def compile_model(model: keras.Model, params: TrainParams, *, jit_compile: bool, steps_per_epoch: int) -> None:
    """The recipe's optimizer and loss. Labels are class indices, or one-hot rows with label smoothing
    (`one_hot_labels` says which); the tutorial's recipe is plain Adam on class indices."""
    import keras

    rate = params.learning_rate
    if params.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=params.epochs * steps_per_epoch)
    optimizer = (
        keras.optimizers.AdamW(rate, weight_decay=params.weight_decay)
        if params.weight_decay
        else keras.optimizers.Adam(learning_rate=rate)
    )
    loss = (
        keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
        if one_hot_labels(params)
        else "sparse_categorical_crossentropy"
    )
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=params.steps_per_execution,
        jit_compile=jit_compile,
    )


def one_hot_labels(params: TrainParams) -> bool:
    """Whether training needs one-hot labels (Keras' sparse cross-entropy has no label smoothing)."""
    return params.label_smoothing > 0


def load_verified_model(store: Store, model: StoredFile) -> keras.Model:
    """Load a `.keras` file only once it hashes to the recorded sha256, and in Keras' safe mode (no pickled code).

    Raises FileNotFoundError if it is missing and `fmnist.storage.IntegrityError` if it is not the file
    that was recorded.
    """
    import keras

    return keras.models.load_model(store.local_copy(model), safe_mode=True)
