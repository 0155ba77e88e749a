"""The closed loop on one machine, step by step (make loop-demo): the champion served with capture on,
new images sent to it, `fashion-mnist review`, a stand-in reviewer, `fashion-mnist review --submit`,
and the retrain the batch triggers, until the running server answers with the new champion.

Needs a champion and the data (`make run`) and, for the retrain, the single-host stack, each in a
terminal of its own: `make server`, `make deploy`, `make worker-cpu`, `make worker-gpu`. Without a
Prefect server it stops after the submit (nothing hears the batch event).

The "new" images are training images moved 2 pixels to the right (the champion was never shown
shifted ones, so it gets some wrong); the stand-in reviewer moves each review image to the class the
image really is, as a person would. Prints each step, then one JSON line: images captured and
relabeled, and the seconds from `review --submit` to the new champion served (or to the verdict).

    .venv/bin/python bench/loop_demo.py [--registry artifacts] [--data-root data] [--images 300]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_load import PREDICT, Server  # noqa: E402
from fmnist.data.dataset import CLASS_SLUGS  # noqa: E402
from fmnist.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx  # noqa: E402
from fmnist.registry.versions import Registry  # noqa: E402
from fmnist.storage import Store  # noqa: E402
from tests.serving_helpers import captured_and_written  # noqa: E402

CLI = [sys.executable, "-m", "fmnist.ops.cli"]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True)
    print((done.stdout + done.stderr).rstrip())
    if done.returncode:
        raise SystemExit(f"fashion-mnist {' '.join(args)}: exit status {done.returncode}")
    return done


def new_images(data_root: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    raw = data_root / "raw"
    chosen = np.random.default_rng(26).choice(60_000, count, replace=False)
    images = read_idx(raw / "train-images-idx3-ubyte", IMAGES_MAGIC)[chosen]
    return np.roll(images, 2, axis=2), read_idx(raw / "train-labels-idx1-ubyte", LABELS_MAGIC)[chosen]


def served_version(url: str) -> str:
    status = httpx.get(f"{url}/v1/models/fashion-mnist").json()
    return status["model_version_status"][0]["version"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default="artifacts")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--timeout-s", type=float, default=1800, help="longest wait for the retrain")
    args = parser.parse_args()
    registry = Registry(Store(), str(Path(args.registry).resolve()))
    champion = registry.champion()
    if champion is None or not (args.data_root / "raw" / "train-images-idx3-ubyte").exists():
        raise SystemExit("no champion or no data yet: run make run first")
    registry_flag, data_flag = ("--registry", registry.root), ("--data-root", str(args.data_root.resolve()))

    step(f"Serving the champion {champion}, keeping 10% of answers and every one under 0.6 confidence")
    scratch = Path(tempfile.mkdtemp(prefix="loop-demo-"))
    # Records written each second, not each minute: the demo's reviewer need not wait.
    capture = ("--capture-rate", "0.1", "--capture-below", "0.6", "--capture-flush-s", "1", *data_flag)
    server = Server(registry.root, scratch / "serve.log", *capture)
    try:
        url = f"http://127.0.0.1:{server.port}"
        step(f"Sending {args.images} new images (training images moved 2 pixels right), 4 a request")
        images, labels = new_images(args.data_root, args.images)
        predicted = np.empty(len(images), int)
        for chunk in np.array_split(np.arange(len(images)), max(len(images) // 4, 1)):
            answer = httpx.post(f"{url}{PREDICT}", json={"instances": images[chunk].tolist()})
            answer.raise_for_status()
            predicted[chunk] = np.argmax(answer.json()["predictions"], axis=1)
        print(f"the champion got {(predicted != labels).sum()} of {len(images)} wrong")

        step("Waiting for the captured records to be written")
        deadline = time.monotonic() + 30
        while not captured_and_written(url, args.data_root) and time.monotonic() < deadline:
            time.sleep(1)
        review = scratch / "review"
        step(f"fashion-mnist review --out {review}")
        cli(*registry_flag, "review", "--out", str(review), *data_flag)

        step("The reviewer: each wrong image to its true class's folder")
        relabeled = 0
        with open(review / "index.csv", newline="") as index:
            rows = list(csv.DictReader(index))
        for row in rows:
            image = np.array(Image.open(review / row["file"]))
            truth = CLASS_SLUGS[labels[np.flatnonzero((images == image).all(axis=(1, 2)))[0]]]
            if truth != row["predicted"]:
                (review / "images" / truth).mkdir(exist_ok=True)
                shutil.move(review / row["file"], review / "images" / truth)
                relabeled += 1
        print(f"{relabeled} of {len(rows)} moved")

        step("fashion-mnist review --submit")
        submitted = time.monotonic()
        done = cli(*registry_flag, "review", "--submit", "--out", str(review), *data_flag)
        outcome = {"captured": len(rows), "relabeled": relabeled, "submit_to_served_s": None, "new_version": None}
        if "Announced it" in done.stdout:
            step("Waiting for the triggered retrain (after 60 s without another batch) and its verdict")
            before = set(registry.versions())
            while time.monotonic() - submitted < args.timeout_s:
                if served_version(url) != str(int(champion[1:])):
                    outcome["new_version"] = registry.champion()
                    outcome["submit_to_served_s"] = round(time.monotonic() - submitted, 1)
                    print(f"the server answers with {registry.champion()} now, {outcome['submit_to_served_s']} s on")
                    break
                if [v for v in set(registry.versions()) - before if not registry.manifest(v).gate.passed]:
                    print(f"a new version was registered and kept back by the gate; {champion} stays served")
                    break
                time.sleep(1)
            else:
                print(f"no new version within {args.timeout_s:g} s: are the workers running (make worker-cpu/-gpu)?")
            if outcome["new_version"]:
                lineage = registry.manifest(outcome["new_version"]).data.feedback
                print(
                    f"{outcome['new_version']} learned from {lineage.reviewed_images} reviewed images "
                    f"({', '.join(lineage.reviewed_batches)}), served by {lineage.served_versions}"
                )
    finally:
        server.stop()
    print(json.dumps({"loop_demo": outcome}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
