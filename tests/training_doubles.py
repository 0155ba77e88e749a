"""A stand-in for the training flow, deployed on a real work pool, for testing how the retraining flow
waits on training runs (`flows.train.train_on_deployment`): it takes the training flow's parameters and
dies, fails or completes as the test's `plan.json` in the run folder says, attempt after attempt."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from prefect import flow

from fmnist.data.cache import CachedDataset
from fmnist.storage import StoredFile
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.fit import TrainResult, save_result
from fmnist.training.model import TrainParams
from fmnist.training.run_folder import RunFolder

PLAN = "plan.json"  # {"crashes": N, "fail": bool}: die the first N attempts; or raise every time


@flow(name="training-double")
def training_double(cached: CachedDataset, params: TrainParams, run: RunLayout, storage: StorageParams) -> None:
    folder = Path(run.location)
    plan = json.loads((folder / PLAN).read_text())
    attempts = len(list(folder.glob("attempt-*"))) + 1
    (folder / f"attempt-{attempts}").touch()
    if plan.get("fail"):
        raise RuntimeError(f"the double failed on attempt {attempts}, as planned")
    if attempts <= plan["crashes"]:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer, or a lost host, ends a process
    model = StoredFile(run.file("model.keras"), "0" * 64)
    result = TrainResult(
        run=run,
        model=model,
        history=StoredFile(run.file(RunLayout.HISTORY), "1" * 64),
        device="double",
        mixed_precision=False,
        host={},
        libraries={},
        epochs=params.epochs,
        resumed_at_epoch=attempts,  # what the waiting flow gets back tells which attempt completed
        seconds_per_epoch=0.0,
        loss=0.5,
        accuracy=0.9,
    )
    save_result(RunFolder(storage.store(), run), result)
