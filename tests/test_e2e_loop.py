"""The feedback loop end to end (issue 26), with real processes: `prefect server start` on its own
PostgreSQL, `make deploy`, a worker for each pool, and `fashion-mnist serve` with capture on; the
operator's `review` and `review --submit`; the trigger's run; the running server switching to the new
champion. In a file of its own, so that make test's two processes can run it beside test_e2e.py."""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fmnist.data.dataset import CLASS_SLUGS
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from tests.helpers import synthetic_images
from tests.prefect_stack import (
    FINAL_STATES,
    Stack,
    local_storage,
    make,
    prefect_server,
    small_run_params,
    start_deployment_run,
    wait_for,
)
from tests.serving_helpers import PREDICT, captured_and_written, running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with prefect_server(tmp_path_factory.mktemp("loop"), database="postgres") as stack:
        make(stack, "deploy")
        stack.start("worker-cpu", "worker", "start", "--pool", "fashion-mnist-cpu")
        stack.start("worker-gpu", "worker", "start", "--pool", "fashion-mnist-gpu")
        yield stack


def shifted_bands(labels: np.ndarray, seed: int) -> np.ndarray:
    """Images the champion has never seen the like of: each band one row lower than in the training
    data, half way to the next class's."""
    images = synthetic_images(labels, seed)
    return np.roll(images, 1, axis=1)


@pytest.mark.slow  # two retrains, a server and a review (2.5 minutes): make test-slow; its parts are in make test
def test_the_loop_from_served_images_to_a_retrained_champion_served(stack: Stack) -> None:
    """Issue 26's loop, with real processes: the champion served with capture on; requests, some of them
    of images it gets wrong; `review`; a person's moves to the true classes; `review --submit`; the
    trigger's run through the deployment; the gate; the running server switching to the new champion."""
    run_params = small_run_params(stack.tmp / "mirror")
    storage = local_storage(stack, "-loop")
    data_root, registry_root = Path(storage["data_root"]), storage["registry_root"]
    first = stack.finished(start_deployment_run(stack, run_params, storage))
    assert first["state_type"] == "COMPLETED", first["state"]
    registry = Registry(Store(), registry_root)
    assert registry.champion() == "v0001"
    # The triggered run gets the deployment's parameters and the batch's storage: the operator sets them
    # as in the UI (these: the small dataset, and a gate any version trained on it passes).
    adhoc = stack.get("/deployments/name/retrain-fashion-mnist/adhoc")
    loop_params = {**run_params, "promotion": {"min_accuracy": 0.5, "tolerance": 0.5}}
    patched = httpx.patch(
        f"{stack.api}/deployments/{adhoc['id']}", json={"parameters": {**adhoc["parameters"], "params": loop_params}}
    )
    assert patched.is_success, patched.text
    clean_labels, odd_labels = np.arange(200, dtype=np.uint8) % 10, np.arange(100, dtype=np.uint8) % 10
    sent = np.concatenate([synthetic_images(clean_labels, seed=60), shifted_bands(odd_labels, seed=61)])
    truth = np.concatenate([clean_labels, odd_labels])
    order = np.random.default_rng(62).permutation(len(sent))
    review = stack.tmp / "loop-review"
    capture = (
        "--capture-rate",
        "0.1",
        "--capture-below",
        "0.9",
        "--capture-flush-s",
        "1",
        "--data-root",
        str(data_root),
    )
    try:
        with running_server(registry_root, stack.tmp / "loop-serve.log", stack.env, *capture) as server:
            predicted = np.empty(len(sent), int)
            for chunk in np.array_split(order, 120):  # 120 requests of 2 or 3 images
                answer = httpx.post(f"{server.url}{PREDICT}", json={"instances": sent[chunk].tolist()}, timeout=30)
                assert answer.status_code == 200, answer.text
                predicted[chunk] = np.argmax(answer.json()["predictions"], axis=1)
            assert (predicted != truth).any(), "the champion got every image right: nothing for the loop to learn"

            captured = wait_for(
                "the captured records written", lambda: captured_and_written(server.url, data_root), timeout_s=30
            )
            offered = stack.cli(
                "--registry", registry_root, "review", "--out", str(review), "--data-root", str(data_root)
            )
            assert offered.returncode == 0 and f"{captured} captured images" in offered.stdout, offered.stderr
            # The person: each image to its true class's folder.
            with open(review / "index.csv", newline="") as index:
                rows = list(csv.DictReader(index))
            assert len(rows) == captured
            moved = 0
            for row in rows:
                image = np.array(Image.open(review / row["file"]))
                [true_label] = {int(truth[i]) for i in np.flatnonzero((sent == image).all(axis=(1, 2)))}
                if CLASS_SLUGS[true_label] != row["predicted"]:
                    (review / "images" / CLASS_SLUGS[true_label]).mkdir(exist_ok=True)
                    shutil.move(review / row["file"], review / "images" / CLASS_SLUGS[true_label])
                    moved += 1
            assert moved, "none of the captured images was wrong"
            submitted_at = time.monotonic()
            submit = stack.cli(
                "--registry",
                registry_root,
                "review",
                "--submit",
                "--out",
                str(review),
                "--data-root",
                str(data_root),
                "--name",
                "feedback-loop",
            )
            assert submit.returncode == 0 and "Announced it" in submit.stdout, submit.stdout + submit.stderr
            assert f"{captured} reviewed images ({moved} relabeled, 0 deleted)" in submit.stdout

            def triggered_run() -> list[dict]:
                runs = stack.filter("/flow_runs/filter", {"deployments": {"name": {"any_": ["adhoc"]}}})
                incoming = str(data_root / "incoming")
                return [r for r in runs if r["parameters"].get("storage", {}).get("incoming_dir") == incoming]

            [retrain] = wait_for("the retrain the batch triggered", triggered_run, timeout_s=180, every_s=2)
            assert retrain["created_by"]["type"] == "AUTOMATION"
            done = wait_for(
                "the triggered retrain to finish",
                lambda: (run := stack.get(f"/flow_runs/{retrain['id']}"))["state_type"] in FINAL_STATES and run,
                timeout_s=400,
                every_s=2,
            )
            assert done["state_type"] == "COMPLETED", done["state"]
            assert registry.versions() == ["v0001", "v0002"] and registry.champion() == "v0002"

            def serving(version: str) -> bool:
                status = httpx.get(f"{server.url}/v1/models/fashion-mnist").json()["model_version_status"]
                return status[0]["version"] == version

            wait_for("the server to serve v0002", lambda: serving("2"), timeout_s=30, every_s=0.2)
            served_after_s = time.monotonic() - submitted_at
            answer = httpx.post(f"{server.url}{PREDICT}", json={"instances": sent[:4].tolist()}, timeout=30)
            assert answer.status_code == 200
    finally:
        httpx.patch(f"{stack.api}/deployments/{adhoc['id']}", json={"parameters": adhoc["parameters"]})
    # The new version knows what it learned from: the reviewed batch, its images, the version that served them.
    feedback = registry.manifest("v0002").data.feedback
    assert (feedback.reviewed_batches, feedback.reviewed_images, feedback.served_versions) == (
        ["feedback-loop"],
        captured,
        {"v0001": captured},
    )
    card = registry.store.read_bytes(registry.file("v0002", "model_card.md").location).decode()
    assert f"{captured} of them reviewed feedback from the served versions v0001 ({captured})" in card
    shown = stack.cli("--registry", registry_root, "show", "v0002")
    assert json.loads(shown.stdout)["feedback"]["reviewed_images"] == captured
    print(f"loop: {captured} captured, {moved} relabeled; review --submit to v0002 served in {served_after_s:.0f} s")
