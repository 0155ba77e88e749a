"""The dense networks' training as one TensorFlow graph per epoch, with Adam as TensorFlow's fused kernel.

Keras' `fit` runs a compiled step per batch (or per `steps_per_execution` batches), goes back to
Python between calls, and updates each variable with Adam as a chain of elementwise operations.
Here a whole epoch is one `tf.function` call: shuffling, batches, forward and backward passes by
hand (softmax and cross-entropy as one kernel, ReLU and dropout as one mask), and the update of each
variable by `ResourceApplyAdam`, the same formula as Keras' Adam in one pass. It trains the Keras
model's own variables and the Keras optimizer's own moments, so checkpoints, `model.save` and
everything after training see an ordinary Keras model.

The arithmetic is the recipe's, the random draws are not: batches are shuffled and dropout masks
drawn from stateless generators keyed by (seed, epoch, step), so a run is reproducible and a
resumed epoch gets the same draws, but a seed does not give the tutorial's exact run
(`training.exact` keeps `fit`). Only the CPU runs it: it is not yet checked on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fmnist.model import TrainParams

if TYPE_CHECKING:
    import keras
    import numpy as np

    from fmnist.training import DevicePlan


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

    An epoch's graph has independent work side by side (the next batch and its dropout mask, one
    layer's update beside the next layer's gradients). On 2 cores one thread per operation and two
    at once measured 10% faster than two threads per operation. TensorFlow takes this only before
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
    """Train like `model.fit(images, labels, batch_size, epochs, shuffle=True, callbacks=...)`.

    `callbacks` get the calls `fit` makes per epoch, with `loss` and `accuracy` (means over the
    epoch's training batches, as `fit` reports them); a resumed run starts at the epoch that Keras'
    `BackupAndRestore` restored, as in `fit`.
    """
    import keras
    import tensorflow as tf

    layers = dense_layers(model)
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    moments = [
        (optimizer._momentums[i], optimizer._velocities[i])  # the Keras optimizer's own state, checkpointed with it
        for i in (optimizer._get_variable_index(v) for layer in layers for v in (layer.kernel, layer.bias))
    ]
    epoch_graph = _epoch_graph(layers, moments, optimizer, params.batch_size)
    x = tf.constant(images.reshape(len(images), -1), tf.float32)
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


def _epoch_graph(layers: list[DenseLayer], moments: list, optimizer, batch_size: int):
    import tensorflow as tf

    weights = [(layer.kernel.value, layer.bias.value) for layer in layers]
    slots = [(m.value, v.value) for m, v in moments]
    iterations, learning_rate = optimizer.iterations.value, optimizer.learning_rate
    beta_1, beta_2, epsilon = optimizer.beta_1, optimizer.beta_2, optimizer.epsilon
    widths = [layer.kernel.shape[1] for layer in layers[:-1]]
    rates = [layer.dropout for layer in layers[:-1]]
    dropout = any(rates)

    @tf.function(autograph=False)
    def epoch(x, y, key):
        rows = tf.shape(x)[0]
        order = tf.random.experimental.stateless_shuffle(tf.range(rows), seed=key)
        steps = (rows + batch_size - 1) // batch_size

        def step(i, loss_sum, correct):
            batch = order[i * batch_size : tf.minimum((i + 1) * batch_size, rows)]
            inputs, targets = tf.gather(x, batch), tf.gather(y, batch)
            if dropout:  # one draw for every layer's mask
                noise = tf.random.stateless_uniform(
                    tf.stack([tf.shape(batch)[0], sum(widths)]),
                    seed=tf.random.experimental.stateless_fold_in(key, i + 1),
                )
                noises = tf.split(noise, widths, axis=1)
            # Forward: keep each layer's input; a hidden output is relu(z) * mask / (1 - rate), which is
            # above 0 exactly where the gradient flows back.
            activations = [inputs]
            for index, (kernel, bias) in enumerate(weights[:-1]):
                hidden = tf.nn.relu(tf.nn.bias_add(tf.matmul(activations[-1], kernel), bias))
                if rates[index]:
                    keep = tf.cast(noises[index] >= rates[index], tf.float32) * (1 / (1 - rates[index]))
                    hidden = hidden * keep
                activations.append(hidden)
            kernel, bias = weights[-1]
            logits = tf.nn.bias_add(tf.matmul(activations[-1], kernel), bias)
            losses, grad = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=logits, labels=targets)
            grad = grad / tf.cast(tf.shape(batch)[0], tf.float32)  # the batch's mean loss
            # Backward, output layer first.
            grads = []
            for index in reversed(range(len(weights))):
                grads.append((tf.matmul(activations[index], grad, transpose_a=True), tf.reduce_sum(grad, 0)))
                if index:
                    upstream = tf.matmul(grad, weights[index][0], transpose_b=True)
                    if rates[index - 1]:
                        upstream = upstream * (1 / (1 - rates[index - 1]))
                    grad = tf.raw_ops.ReluGrad(gradients=upstream, features=activations[index])
            grads.reverse()
            # Adam as Keras computes it, one kernel a variable: step t = iterations + 1, then iterations += 1.
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
                    grad=gradient,
                )
                for variable, gradient, (m, v) in zip(
                    [w for pair in weights for w in pair], [g for pair in grads for g in pair], slots, strict=True
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
        return loss_sum / tf.cast(rows, tf.float32), tf.cast(correct, tf.float32) / tf.cast(rows, tf.float32)

    return epoch
