"""A flow that only waits, deployed on a real work pool, for testing what `fashion-mnist worker` does with
the runs it started when it is stopped (`fmnist.ops.worker`)."""

from __future__ import annotations

import signal
import time

from prefect import flow


@flow(name="waits")
def waits(seconds: float = 600, stubborn: bool = False) -> None:
    """Wait; `stubborn`: as a run slow to stop (a training run saving), ignoring SIGTERM and SIGINT."""
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(seconds)
