"""Which devices a run trains on, and how: decided once, before the model is built, and read by both
training loops (Keras' fit in `fit.py`, the compiled epoch in `fast_fit.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from fmnist.training.model import TrainParams


class NoGpuError(RuntimeError):
    """The run requires a GPU and this worker has none."""


@dataclass(frozen=True)
class DevicePlan:
    description: str
    gpus: int
    mixed_precision: bool
    jit_compile: bool


def plan_devices(params: TrainParams) -> DevicePlan:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if params.require_gpu and not gpus:
        raise NoGpuError(
            "require_gpu is set, but TensorFlow sees no GPU on this worker: install the project with the "
            "and-cuda extra (tensorflow[and-cuda]) and check that nvidia-smi lists the GPU"
        )
    if not gpus:
        return DevicePlan("CPU (no GPU visible)", 0, params.mixed_precision == "on", jit_compile=False)
    details = tf.config.experimental.get_device_details(gpus[0])
    tensor_cores = tuple(details.get("compute_capability", (0, 0))) >= (7, 0)
    mixed = {"on": True, "off": False, "auto": tensor_cores}[params.mixed_precision]
    name = details.get("device_name", "GPU")
    return DevicePlan(f"{len(gpus)} x {name}", len(gpus), mixed, jit_compile=not params.deterministic)
