"""Training speed, and the whole run's cost: the project against the tutorial's plain script, side by side.

For each seed (0-3 by default), in fresh processes, one after another:
- plain: the tutorial's script (`bench/plain_tutorial.py`), timed as a whole process;
- project: the project's training step (`train_model`) on the parquet cache;
- pipeline: a whole cold run (`python -m flows.run_once`: download, validation, cache, training,
  evaluation, registration into empty folders), timed as a whole process; its history gives the
  epochs as they ran inside the flow.
After the first seed's pipeline run, the same run again: nothing changed, nothing trained.

Same recipe everywhere: the `dnn` preset, batch 64, `--epochs`. Accuracy is judged as the mean of
the seeds (one seed moves by +-0.006 with any change of rounding order). Prints the seconds per
epoch, the ratios, the accuracies, and the training arithmetic rate next to numpy's float32
matrix-multiply rate measured in the same run. Then one JSON line.

    .venv/bin/python bench/train_speed.py [--seeds 0 1 2 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

BENCH = Path(__file__).parent
ROOT = BENCH.parent
TARGETS = {"epoch_speedup": 3.0, "in_flow_over_bench": 1.10, "whole_run_ratio": 1.0, "accuracy_drop": 0.005}
# Multiply-adds of the reference DNN per image, forward: 784x512 + 512x128 + 128x10.
FORWARD_FLOPS = 2 * (784 * 512 + 512 * 128 + 128 * 10)
# Backward: gradients of the weights of every layer and of the activations of all but the first.
BACKWARD_FLOPS = 2 * (784 * 512 + 2 * 512 * 128 + 2 * 128 * 10)


def project_run(seed: int, epochs: int) -> dict:
    """The pipeline's own stages: data from the parquet cache, then `train_model`."""
    import keras

    from fmnist.data.cache import read_part
    from fmnist.data.dataset import DEFAULT_MIRRORS, FASHION_MNIST
    from fmnist.data.download import download_dataset
    from fmnist.data.normalization import normalize_and_cache
    from fmnist.data.validation import validate_raw
    from fmnist.storage import Store
    from fmnist.storage.layout import DataLayout, RunLayout
    from fmnist.training.fit import train_model
    from fmnist.training.model import TrainParams
    from fmnist.training.run_folder import RunFolder

    with tempfile.TemporaryDirectory() as tmp:
        layout, store = DataLayout(str(Path(tmp) / "data")), Store()
        raw = download_dataset(FASHION_MNIST, DEFAULT_MIRRORS[:1], store, layout.raw)
        report = validate_raw(FASHION_MNIST, raw, [], store, layout.validation)
        cached = normalize_and_cache(FASHION_MNIST, raw, [], report, store, layout)
        started = time.perf_counter()
        result = train_model(
            cached, TrainParams(seed=seed, epochs=epochs), RunFolder(store, RunLayout(str(Path(tmp) / "run")))
        )
        fit_s = time.perf_counter() - started
        history = json.loads(Path(result.history.location).read_text())["epochs"]
        test_images, test_labels = read_part(Path(cached.test.path))
        model = keras.models.load_model(result.model.location)
        test_loss, test_acc = model.evaluate(test_images, test_labels, verbose=0)
    return {
        "epoch_s": [h["seconds"] for h in history],
        "train_model_s": fit_s,
        "test_accuracy": float(test_acc),
        "test_loss": float(test_loss),
    }


def plain_run(seed: int, epochs: int) -> dict:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(BENCH / "plain_tutorial.py"), "--seed", str(seed), "--epochs", str(epochs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def project_child(seed: int, epochs: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--seeds", str(seed), "--epochs", str(epochs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def pipeline_run(folder: Path, seed: int, epochs: int, prefect_home: Path) -> dict:
    """`make run`'s process in `folder` (its data/ and artifacts/), with a Prefect home that has its database."""
    folder.mkdir(parents=True, exist_ok=True)
    params = json.dumps({"training": {"seed": seed, "epochs": epochs}})
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "flows.run_once", "--params", params],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    result = {"wall_s": wall, "flow_s": flow_seconds(out.stdout + out.stderr)}
    if "nothing retrained" not in out.stdout:
        version = sorted((folder / "artifacts" / "versions").glob("v*"))[-1]
        history = json.loads((version / "history.json").read_text())["epochs"]
        manifest = json.loads((version / "manifest.json").read_text())
        result.update(epoch_s=[h["seconds"] for h in history], test_accuracy=manifest["metrics"]["test_accuracy"])
    return result


def flow_seconds(log: str) -> float:
    """The retrain flow run's own time, from Prefect's log lines: its start to its final state."""
    times = re.findall(
        r"^(\d\d:\d\d:\d\d\.\d+) \| INFO +\| Flow run '([\w-]+)' - (Beginning flow run|Finished)", log, re.M
    )
    first = next((t, name) for t, name, what in times if what == "Beginning flow run")
    last = [t for t, name, what in times if name == first[1] and what == "Finished"][-1]
    clock = [datetime.strptime(t, "%H:%M:%S.%f") for t in (first[0], last)]
    return (clock[1] - clock[0]).total_seconds()


def numpy_sgemm_rate() -> dict:
    """float32 matmul FLOP/s: at the model's first-layer shape, and at a large square size."""

    def rate(m: int, k: int, n: int, repeats: int) -> float:
        a = np.random.rand(m, k).astype(np.float32)
        b = np.random.rand(k, n).astype(np.float32)
        a @ b
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * m * k * n * repeats / (time.perf_counter() - started)

    return {"batch64_784x512": rate(64, 784, 512, 2000), "square_2048": rate(2048, 2048, 2048, 10)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(project_run(args.seeds[0], args.epochs)))
        return

    runs: dict[str, list[dict]] = {"plain": [], "project": [], "pipeline": []}
    with tempfile.TemporaryDirectory() as tmp:
        prefect_home = Path(tmp) / "prefect"
        subprocess.run(
            [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
            env={**os.environ, "PREFECT_HOME": str(prefect_home)},
            check=True,
            capture_output=True,
        )
        for seed in args.seeds:
            runs["plain"].append(plain_run(seed, args.epochs))
            runs["project"].append(project_child(seed, args.epochs))
            runs["pipeline"].append(pipeline_run(Path(tmp) / f"run-{seed}", seed, args.epochs, prefect_home))
            if seed == args.seeds[0]:
                unchanged = pipeline_run(Path(tmp) / f"run-{seed}", seed, args.epochs, prefect_home)
            print(
                f"seed {seed}: " + ", ".join(f"{k} {v[-1]['test_accuracy']:.4f}" for k, v in runs.items()), flush=True
            )
    sgemm = numpy_sgemm_rate()

    summary = {}
    for kind, results in runs.items():
        summary[kind] = {
            "seconds_per_epoch": statistics.median(statistics.mean(r["epoch_s"]) for r in results),
            "steady_seconds_per_epoch": statistics.median(
                statistics.mean(r["epoch_s"][1:] or r["epoch_s"]) for r in results
            ),
            "mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in results),
            "test_accuracies": [r["test_accuracy"] for r in results],
        }
        if kind != "project":
            summary[kind]["wall_s"] = statistics.median(r["wall_s"] for r in results)
    plain, project, pipeline = summary["plain"], summary["project"], summary["pipeline"]
    ratios = {
        "epoch_speedup": plain["seconds_per_epoch"] / project["seconds_per_epoch"],
        "steady_epoch_speedup": plain["steady_seconds_per_epoch"] / project["steady_seconds_per_epoch"],
        "in_flow_epoch_speedup": plain["seconds_per_epoch"] / pipeline["seconds_per_epoch"],
        "in_flow_over_bench": pipeline["seconds_per_epoch"] / project["seconds_per_epoch"],
        "whole_run_ratio": pipeline["wall_s"] / plain["wall_s"],
        "accuracy_delta": project["mean_test_accuracy"] - plain["mean_test_accuracy"],
        "pipeline_accuracy_delta": pipeline["mean_test_accuracy"] - plain["mean_test_accuracy"],
    }
    train_flops = 60_000 * (FORWARD_FLOPS + BACKWARD_FLOPS)
    project_rate = train_flops / project["steady_seconds_per_epoch"]

    print(f"\nReference DNN, {args.epochs} epochs, batch 64, seeds {args.seeds}: medians of per-run means")
    print(f"{'':10}{'s/epoch':>9}{'steady':>9}{'wall s':>9}{'mean accuracy':>15}")
    for kind, s in summary.items():
        wall = f"{s['wall_s']:>9.1f}" if "wall_s" in s else f"{'':>9}"
        print(
            f"{kind:10}{s['seconds_per_epoch']:>9.2f}{s['steady_seconds_per_epoch']:>9.2f}{wall}"
            f"{s['mean_test_accuracy']:>15.4f}"
        )
    print(
        f"epoch: {ratios['epoch_speedup']:.2f}x the plain script ({ratios['steady_epoch_speedup']:.2f}x after the "
        f"first epoch; target >= {TARGETS['epoch_speedup']}x); in the flow {ratios['in_flow_epoch_speedup']:.2f}x, "
        f"{ratios['in_flow_over_bench']:.2f} of the bench's epoch (target <= {TARGETS['in_flow_over_bench']})"
    )
    print(
        f"whole cold run: {ratios['whole_run_ratio']:.2f}x the plain script's wall time (target <= "
        f"{TARGETS['whole_run_ratio']}); nothing changed: {unchanged['wall_s']:.1f} s wall, "
        f"{unchanged['flow_s']:.1f} s of flow"
    )
    print(
        f"accuracy, mean of the seeds: project {ratios['accuracy_delta']:+.4f}, pipeline "
        f"{ratios['pipeline_accuracy_delta']:+.4f} against the plain script (target >= -{TARGETS['accuracy_drop']})"
    )
    print(
        f"training arithmetic {project_rate / 1e9:.0f} GFLOP/s ({train_flops:.2e} FLOP an epoch); "
        f"numpy sgemm {sgemm['batch64_784x512'] / 1e9:.0f} GFLOP/s at 64x784x512, "
        f"{sgemm['square_2048'] / 1e9:.0f} GFLOP/s at 2048^3; "
        f"ratio {project_rate / sgemm['square_2048']:.2f} of the large-matrix rate"
    )
    print(
        json.dumps(
            {
                "bench": "train_speed",
                "seeds": args.seeds,
                "epochs": args.epochs,
                **summary,
                **ratios,
                "nothing_changed": unchanged,
                "train_flop_per_s": project_rate,
                "numpy_sgemm_flop_per_s": sgemm,
                "flop_rate_ratio": project_rate / sgemm["square_2048"],
                "targets": TARGETS,
                "epoch_speedup_ok": ratios["epoch_speedup"] >= TARGETS["epoch_speedup"],
                "in_flow_ok": ratios["in_flow_over_bench"] <= TARGETS["in_flow_over_bench"],
                "whole_run_ok": ratios["whole_run_ratio"] <= TARGETS["whole_run_ratio"],
                "accuracy_ok": ratios["accuracy_delta"] >= -TARGETS["accuracy_drop"],
            }
        )
    )


if __name__ == "__main__":
    main()
