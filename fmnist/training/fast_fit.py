"""The dense networks' training as one TensorFlow graph per epoch, with Adam as TensorFlow's fused kernel.

Keras' `fit` runs a compiled step per batch (or per `steps_per_execution` batches), goes back to
Python between calls, and updates each variable with Adam as a chain of elementwise operations.
Here a whole epoch is one `tf.function` call: shuffling, batches, forward and backward passes by
hand (softmax and cross-entropy as one kernel, ReLU and dropout as one mask), and the update of each
variable by `ResourceApplyAdam`, the same formula as Keras' Adam in one pass. A wide hidden layer is
trained as blocks of its units, each with variables of its own, so that its products and updates
run side by side on the cores rather than one after another. The epoch starts from the Keras model's
own variables and the Keras optimizer's own moments and ends by storing them back, so callbacks,
checkpoints, `model.save` and everything after training see an ordinary Keras model.

The arithmetic is the recipe's, the random draws are not: batches are shuffled and dropout masks
drawn from stateless generators keyed by (seed, epoch, step), so a run is reproducible and a
resumed epoch gets the same draws, but a seed does not give the tutorial's exact run
(`training.exact` keeps `fit`). Only the CPU runs it: it is not yet checked on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from fmnist.data.cache import SCALED, TENSOR_ALIGNMENT
from fmnist.training.model import TrainParams

if TYPE_CHECKING:
    import keras
    import numpy as np

    from fmnist.training.devices import DevicePlan


# A hidden layer's units are trained in blocks of about this many (`_ColumnBlocks`). On 2 cores the
# 512-unit layer in 4 blocks measured 0.88 s an epoch, in 2 blocks 0.91 s, in 8 blocks 0.96 s, whole
# 1.19 s; splitting the 128-unit layer as well made it slower (0.93 s).
BLOCK_COLUMNS = 128


@dataclass(frozen=True)
class DenseLayer:
    kernel: object  # the Keras variables
    bias: object
    dropout: float  # rate applied to this layer's output; the output layer has none


def unsupported(params: TrainParams, plan: DevicePlan) -> str | None:
    """Why this run's recipe or devices cannot take the fast path (`None`: they can)."""
    if params.exact:
        return "training.exact is set"
    if plan.gpus or plan.mixed_precision:
        return "the fast path runs on CPUs in float32 only, until it is checked on GPUs"
    if params.validation_fraction or params.schedule != "constant" or params.label_smoothing or params.weight_decay:
        return "the recipe has a validation split, a schedule, label smoothing or weight decay"
    return None


def unsupported_network(model: keras.Model) -> str | None:
    """Why this compiled model cannot take the fast path (`None`: it can)."""
    import keras

    optimizer = model.optimizer
    if type(optimizer) is not keras.optimizers.Adam:  # AdamW is a subclass, with other math
        return f"the optimizer is {type(optimizer).__name__}, not Adam"
    extras = (optimizer.amsgrad, optimizer.clipnorm, optimizer.clipvalue, optimizer.global_clipnorm, optimizer.use_ema)
    if any(extras) or not isinstance(optimizer.learning_rate, keras.Variable):
        return "the optimizer uses AMSGrad, clipping, an average of weights or a learning-rate schedule"
    if dense_layers(model) is None:
        return "the network is not Flatten, Dense(relu) and Dropout layers with a softmax output"
    return None


def dense_layers(model: keras.Model) -> list[DenseLayer] | None:
    """The network as dense layers (hidden ReLU, softmax output), or `None` when it is something else."""
    from keras import layers

    found: list[DenseLayer] = []
    activations: list[str] = []
    for layer in model.layers:
        if isinstance(layer, layers.Flatten) and not found:
            continue
        if isinstance(layer, layers.Dropout) and found and not found[-1].dropout:
            found[-1] = DenseLayer(found[-1].kernel, found[-1].bias, layer.rate)
        elif type(layer) is layers.Dense and layer.use_bias:
            found.append(DenseLayer(layer.kernel, layer.bias, 0.0))
            activations.append(layer.activation.__name__)
        else:
            return None
    if activations[-1:] != ["softmax"] or found[-1].dropout or set(activations[:-1]) - {"relu"}:
        return None
    return found


def set_cpu_threads() -> None:
    """Two streams of operations, each on half the cores.

    An epoch's graph has independent work side by side (the blocks of a layer, the next batch and its
    dropout mask, one layer's update beside the next layer's gradients). On 2 cores one thread per
    operation and two operations at once measured 0.89 s an epoch, against 1.24 s for two threads
    per operation and 0.95-1.0 s for three or four operations at once. TensorFlow takes this only before
    its first operation; later (a process that already trained) the setting it has is kept.
    """
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cores // 2))
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass


def fit(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    params: TrainParams,
    callbacks: Sequence[keras.callbacks.Callback],
) -> None:
    """Train like `model.fit(normalize(images), labels, batch_size, epochs, shuffle=True, callbacks=...)`
    on uint8 `images` ((n, 28, 28) or (n, 784)), which it holds as they are (a quarter of float32).

    `callbacks` get the calls `fit` makes per epoch, with `loss` and `accuracy` (means over the
    epoch's training batches, as `fit` reports them); a resumed run starts at the epoch that Keras'
    `BackupAndRestore` restored, as in `fit`.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    if images.dtype != np.uint8:
        raise TypeError(f"the fast path takes uint8 images (it scales them itself), not {images.dtype}")
    layers = dense_layers(model)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    epoch_graph = _epoch_graph(layers, optimizer, params.batch_size)
    x = as_tensor(images.reshape(len(images), -1))
    y = tf.constant(labels, tf.int32)

    hooks = keras.callbacks.CallbackList(list(callbacks), model=model, epochs=params.epochs)
    model.stop_training = False
    hooks.on_train_begin()
    first = getattr(model, "_initial_epoch", None) or 0  # where BackupAndRestore resumes (fit reads it too)
    for epoch in range(first, params.epochs):
        hooks.on_epoch_begin(epoch)
        key = tf.constant([params.seed, epoch], tf.int64)
        loss, accuracy = epoch_graph(x, y, key)
        hooks.on_epoch_end(epoch, {"loss": float(loss), "accuracy": float(accuracy)})
        if model.stop_training:
            break
    hooks.on_train_end()


def as_tensor(array: np.ndarray):
    """A TensorFlow tensor of `array` that shares its memory (through DLPack) where TensorFlow allows it,
    that is where it is contiguous and aligned (`fmnist.data.cache.aligned_empty`); else a copy.
    `tf.constant` always copies: the training images would be held twice."""
    import tensorflow as tf

    if array.flags.c_contiguous and array.ctypes.data % TENSOR_ALIGNMENT == 0:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.constant(array)


def _epoch_graph(layers: list[DenseLayer], optimizer, batch_size: int):
    import tensorflow as tf

    # Each hidden layer as blocks of its units, each block with variables of its own: per layer, its
    # kernel's and its bias' blocks with their Adam moments.
    parts = [max(1, layer.kernel.shape[1] // BLOCK_COLUMNS) for layer in layers[:-1]] + [1]
    blocks = [
        [_AdamBlocks.of(variable, optimizer, count) for variable in (layer.kernel, layer.bias)]
        for layer, count in zip(layers, parts, strict=True)
    ]
    every_split = [split for layer in blocks for adam in layer for split in adam]
    kernels = [kernel.variable.blocks for kernel, _ in blocks]
    biases = [bias.variable.blocks for _, bias in blocks]
    sizes = [kernel.variable.sizes for kernel, _ in blocks[:-1]]  # each hidden layer's block widths
    widths = [width for layer in sizes for width in layer]  # every hidden block's, in order
    rates = [layer.dropout for layer in layers[:-1]]
    dropout = any(rates)
    iterations, learning_rate = optimizer.iterations.value, optimizer.learning_rate
    beta_1, beta_2, epsilon = optimizer.beta_1, optimizer.beta_2, optimizer.epsilon

    scaled = tf.constant(SCALED)

    @tf.function(autograph=False)
    def epoch(x, y, key):
        for split in every_split:
            split.load()
        rows = tf.shape(x)[0]
        order = tf.random.experimental.stateless_shuffle(tf.range(rows), seed=key)
        steps = (rows + batch_size - 1) // batch_size

        def step(i, loss_sum, correct):
            batch = order[i * batch_size : tf.minimum((i + 1) * batch_size, rows)]
            # Each pixel's float32 value looked up, exactly as `normalize` makes it: the images stay uint8.
            inputs = tf.gather(scaled, tf.cast(tf.gather(x, batch), tf.int32))
            targets = tf.gather(y, batch)
            if dropout:  # one draw for every block's mask
                noise = tf.random.stateless_uniform(
                    tf.stack([tf.shape(batch)[0], sum(widths)]),
                    seed=tf.random.experimental.stateless_fold_in(key, i + 1),
                )
                noises = iter(tf.split(noise, widths, axis=1))
            # Forward: keep each layer's input and each hidden block's output; a hidden output is
            # relu(z) * mask / (1 - rate), which is above 0 exactly where the gradient flows back.
            layer_inputs, hidden_outputs = [inputs], []
            for index, rate in enumerate(rates):
                outputs = []
                for kernel, bias in zip(kernels[index], biases[index], strict=True):
                    hidden = tf.nn.relu(tf.nn.bias_add(tf.matmul(layer_inputs[-1], kernel), bias))
                    if rate:
                        hidden = hidden * (tf.cast(next(noises) >= rate, tf.float32) * (1 / (1 - rate)))
                    outputs.append(hidden)
                hidden_outputs.append(outputs)
                layer_inputs.append(tf.concat(outputs, axis=1) if len(outputs) > 1 else outputs[0])
            logits = tf.nn.bias_add(tf.matmul(layer_inputs[-1], kernels[-1][0]), biases[-1][0])
            losses, grad = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=logits, labels=targets)
            # Backward, output layer first, block by block: the batch's mean loss.
            grad_blocks = [grad / tf.cast(tf.shape(batch)[0], tf.float32)]
            gradients = [None] * len(kernels)
            for index in reversed(range(len(kernels))):
                gradients[index] = [
                    (tf.matmul(layer_inputs[index], g, transpose_a=True), tf.reduce_sum(g, 0)) for g in grad_blocks
                ]
                if index:
                    upstream = tf.add_n(
                        [tf.matmul(g, k, transpose_b=True) for g, k in zip(grad_blocks, kernels[index], strict=True)]
                    )
                    if rates[index - 1]:
                        upstream = upstream * (1 / (1 - rates[index - 1]))
                    pieces = tf.split(upstream, sizes[index - 1], axis=1)
                    grad_blocks = [
                        tf.raw_ops.ReluGrad(gradients=piece, features=output)
                        for piece, output in zip(pieces, hidden_outputs[index - 1], strict=True)
                    ]
            # Adam as Keras computes it, one kernel a block: step t = iterations + 1, then iterations += 1.
            t = tf.cast(iterations + 1, tf.float32)
            beta_1_power, beta_2_power = tf.pow(beta_1, t), tf.pow(beta_2, t)
            rate = tf.cast(learning_rate, tf.float32)
            updates = [
                tf.raw_ops.ResourceApplyAdam(
                    var=variable.handle,
                    m=m.handle,
                    v=v.handle,
                    beta1_power=beta_1_power,
                    beta2_power=beta_2_power,
                    lr=rate,
                    beta1=beta_1,
                    beta2=beta_2,
                    epsilon=epsilon,
                    grad=block_gradients[which],
                )
                for layer, layer_gradients in zip(blocks, gradients, strict=True)
                for which, adam in enumerate(layer)
                for variable, m, v, block_gradients in zip(
                    adam.variable.blocks, adam.m.blocks, adam.v.blocks, layer_gradients, strict=True
                )
            ]
            with tf.control_dependencies(updates):
                counted = iterations.assign_add(1)
            hits = tf.cast(tf.math.in_top_k(targets, logits, 1), tf.int32)
            with tf.control_dependencies([counted]):
                return i + 1, loss_sum + tf.reduce_sum(losses), correct + tf.reduce_sum(hits)

        _, loss_sum, correct = tf.while_loop(
            lambda i, *_: i < steps, step, (tf.constant(0), tf.constant(0.0), tf.constant(0))
        )
        for split in every_split:
            split.store()
        return loss_sum / tf.cast(rows, tf.float32), tf.cast(correct, tf.float32) / tf.cast(rows, tf.float32)

    return epoch


@dataclass(frozen=True)
class _ColumnBlocks:
    """A variable as blocks of its last axis (a layer's units), each a variable of its own.

    Two operations on separate blocks can run side by side (a 64x784x512 product as two 256-column
    halves took 0.16 ms against 0.32 ms on 2 cores), where one operation on the whole runs on one
    thread. The epoch loads the blocks from the Keras variable first and stores them back last, so
    between epochs (callbacks, checkpoints) the Keras variable holds the state.
    """

    whole: object  # the Keras variable's TensorFlow variable
    blocks: list
    sizes: list[int]

    @classmethod
    def of(cls, whole, count: int) -> _ColumnBlocks:
        import tensorflow as tf

        width = whole.shape[-1]
        sizes = [width // count + (block < width % count) for block in range(count)]
        if count == 1:
            return cls(whole, [whole], sizes)
        shape = list(whole.shape[:-1])
        blocks = [tf.Variable(tf.zeros([*shape, size]), trainable=False) for size in sizes]
        return cls(whole, blocks, sizes)

    def load(self) -> None:
        import tensorflow as tf

        if len(self.blocks) > 1:
            for block, value in zip(self.blocks, tf.split(self.whole, self.sizes, axis=-1), strict=True):
                block.assign(value)

    def store(self) -> None:
        import tensorflow as tf

        if len(self.blocks) > 1:
            self.whole.assign(tf.concat(self.blocks, axis=-1))


class _AdamBlocks(NamedTuple):
    """A Keras variable and the Keras optimizer's own moments for it (checkpointed with it), as blocks."""

    variable: _ColumnBlocks
    m: _ColumnBlocks
    v: _ColumnBlocks

    @classmethod
    def of(cls, variable, optimizer, count: int) -> _AdamBlocks:
        index = optimizer._get_variable_index(variable)
        moments = (optimizer._momentums[index], optimizer._velocities[index])
        return cls(*(_ColumnBlocks.of(w.value, count) for w in (variable, *moments)))
