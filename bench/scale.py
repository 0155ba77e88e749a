"""Data that grows: the data stages and training on 1x, 10x and 100x the canonical training set.

A point of N x is the canonical training set and N - 1 incoming batches of 60,000 generated images:
the training images, each batch moved by its own offset (up to 2 pixels), mirrored or dimmed, so
that they are distinct from the training and test images and pass screening. For each point, in a
data root of its own, fresh processes run:
- the data stages cold, as a run does them (download, collect with receipts, validate, normalize),
  with each stage's seconds and the process's peak RSS;
- the data stages again with nothing changed;
- two epochs of training (the default recipe, fast path), with the seconds the second took (the first
  also traces the epoch's graph) and the process's peak RSS, against the uint8 size of its images.
At the largest point, one more 60,000-image batch is added, and the data stages run once more: what
a night costs that adds one batch to a big dataset, against the 1x point's cold data stages.
Prints a table, then one JSON line. The whole bench takes about 20 minutes on 2 cores, most of it
the 100x point (6 million images: 4.7 GB of IDX files, 2.7 GB of cache).

    .venv/bin/python bench/scale.py [--sizes 1 10 100] [--work DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_ROWS = 60_000
MIRROR = "/usr/share/datasets/fashion-mnist/"
TARGETS = {
    "data_peak_rss_mb": 2048,  # at every point
    "training_over_uint8_mb": 2048,  # training's peak RSS over the uint8 size of its images
    "one_more_batch_ratio": 2.0,  # the data stages of a run adding one batch to the largest point, over 1x cold
    "epoch_linearity": 0.15,  # seconds an epoch per image, at each point, within this of the 1x point's
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generated_batches(count: int, folder: Path) -> list[Path]:
    """`count` batches of the training images transformed, as IDX folders (made once, then reused)."""
    import numpy as np

    from fmnist.data import idx

    images = labels = None
    transforms = itertools.islice(
        (
            (dy, dx, flip, dim)
            for dim in (1.0, 0.9, 0.8, 0.7)
            for flip in (False, True)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if (dy, dx, flip, dim) != (0, 0, False, 1.0)
        ),
        count,
    )
    batches = []
    for number, (dy, dx, flip, dim) in enumerate(transforms, start=1):
        batch = folder / f"batch-{number:03}"
        batches.append(batch)
        if (batch / "labels-idx1-ubyte").exists():
            continue
        if images is None:
            images, labels = idx.read_pair(
                Path(MIRROR, "train-images-idx3-ubyte.gz"), Path(MIRROR, "train-labels-idx1-ubyte.gz")
            )
        moved = np.roll(images, (dy, dx), axis=(1, 2))
        if flip:
            moved = moved[:, :, ::-1]
        if dim != 1.0:
            moved = (moved * dim).astype(np.uint8)
        tmp = folder / f".{batch.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "images-idx3-ubyte").write_bytes(idx.encode_idx(np.ascontiguousarray(moved)))
        (tmp / "labels-idx1-ubyte").write_bytes(idx.encode_idx(labels))
        tmp.rename(batch)
    return batches


def link_batches(batches: list[Path], incoming: Path) -> None:
    """The batches in the incoming folder, as hard links: no copy of their bytes."""
    for batch in batches:
        target = incoming / batch.name
        if target.exists():
            continue
        target.mkdir(parents=True)
        for file in batch.iterdir():
            os.link(file, target / file.name)


def data_stages(root: Path) -> dict:
    """The data stages as the flow runs them (`tasks/`), without Prefect; seconds and peak RSS."""
    from fmnist.data.dataset import FASHION_MNIST
    from fmnist.data.download import download_dataset
    from fmnist.data.incoming import known_images, screen_incoming
    from fmnist.data.normalization import normalize_and_cache
    from fmnist.data.validation import validate_raw
    from fmnist.storage import Store
    from fmnist.storage.layout import DataLayout

    layout, store, seconds = DataLayout(str(root / "data")), Store(), {}

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - started, 3)
        return result

    raw = timed("download", lambda: download_dataset(FASHION_MNIST, [MIRROR], store, layout.raw))
    known = known_images(store, raw.test_images.file, raw.train_images.file)
    screening = timed(
        "collect",
        lambda: screen_incoming(
            store, str(root / "incoming"), known, receipts=layout.screened, outcomes=layout.outcomes
        ),
    )
    assert not screening.refused, [r.error for r in screening.refused]
    report = timed("validate", lambda: validate_raw(FASHION_MNIST, raw, screening.batches, store, layout.validation))
    cached = timed(
        "normalize", lambda: normalize_and_cache(FASHION_MNIST, raw, screening.batches, report, store, layout)
    )
    assert report.success
    return {
        "stages_s": seconds,
        "data_s": round(sum(seconds.values()), 3),
        "peak_rss_mb": round(peak_rss_mb()),
        "images": cached.train_rows,
        "parts": len(cached.train),
        "cache_bytes": sum(os.path.getsize(part.path) for part in (*cached.train, cached.test)),
    }


def training(root: Path) -> dict:
    """Two epochs of the default recipe on the point's cached data; each epoch's seconds and peak RSS."""
    from fmnist.data.dataset import FASHION_MNIST
    from fmnist.data.download import download_dataset
    from fmnist.data.incoming import collect_incoming
    from fmnist.data.normalization import normalize_and_cache
    from fmnist.data.validation import validate_raw
    from fmnist.storage import Store
    from fmnist.storage.layout import DataLayout, RunLayout
    from fmnist.training.fit import train_model
    from fmnist.training.model import TrainParams
    from fmnist.training.run_folder import RunFolder

    layout, store = DataLayout(str(root / "data")), Store()
    raw = download_dataset(FASHION_MNIST, [MIRROR], store, layout.raw)
    batches = collect_incoming(store, str(root / "incoming"))
    report = validate_raw(FASHION_MNIST, raw, batches, store, layout.validation)
    cached = normalize_and_cache(FASHION_MNIST, raw, batches, report, store, layout)
    assert cached.reused
    before = peak_rss_mb()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=root) as run:
        result = train_model(cached, TrainParams(epochs=2), RunFolder(store, RunLayout(run)))
        epochs = json.loads(store.local_copy(result.history).read_text())["epochs"]
    return {
        "train_s": round(time.perf_counter() - started, 2),
        "first_epoch_s": round(epochs[0]["seconds"], 2),  # with the graph's tracing
        "epoch_s": round(epochs[1]["seconds"], 2),
        "accuracy": round(result.accuracy, 4),
        "images": cached.train_rows,
        "uint8_mb": round(cached.train_rows * 784 / 2**20),
        "peak_rss_mb": round(peak_rss_mb()),
        "peak_rss_before_training_mb": round(before),
    }


def child(kind: str, root: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--work", str(root)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"{kind} at {root} failed:\n{out.stderr[-4000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--work", type=Path, help="where the generated batches and data roots go (kept)")
    parser.add_argument("--child", choices=["data", "train"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(data_stages(args.work) if args.child == "data" else training(args.work)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="fmnist-scale-"))
    sizes = sorted(set(args.sizes))
    generated = generated_batches(max(sizes), work / "generated")  # one more than the largest point needs
    points = {}
    for size in sizes:
        root = work / f"{size}x"
        shutil.rmtree(root, ignore_errors=True)
        link_batches(generated[: size - 1], root / "incoming")
        cold = child("data", root)
        warm = child("data", root)
        trained = child("train", root)
        points[size] = {"cold": cold, "unchanged": warm, "training": trained}
        print(
            f"{size}x: {cold['images']:,} images, data stages {cold['data_s']} s, epoch {trained['epoch_s']} s",
            flush=True,
        )
    largest = work / f"{sizes[-1]}x"
    link_batches(generated[: sizes[-1]], largest / "incoming")
    one_more = child("data", largest)

    base = points[sizes[0]]
    per_image = {s: p["training"]["epoch_s"] / p["training"]["images"] for s, p in points.items()}
    print("\nData stages (cold, seconds), peak RSS, cache; the second epoch of training and its peak RSS")
    header = f"{'point':>6}{'images':>11}{'download':>10}{'collect':>9}{'validate':>10}{'normalize':>11}{'data':>8}"
    print(
        header
        + f"{'data MB':>9}{'cache MB':>10}{'B/image':>9}{'unchanged':>11}{'epoch':>8}{'train MB':>10}{'uint8 MB':>10}"
    )
    for size, point in points.items():
        cold, trained = point["cold"], point["training"]
        stages = cold["stages_s"]
        print(
            f"{size:>5}x{cold['images']:>11,}{stages['download']:>10.2f}{stages['collect']:>9.2f}"
            f"{stages['validate']:>10.2f}{stages['normalize']:>11.2f}{cold['data_s']:>8.1f}{cold['peak_rss_mb']:>9,}"
            f"{cold['cache_bytes'] / 2**20:>10,.0f}{cold['cache_bytes'] / (cold['images'] + 10_000):>9.0f}"
            f"{point['unchanged']['data_s']:>11.2f}{trained['epoch_s']:>8.2f}{trained['peak_rss_mb']:>10,}"
            f"{trained['uint8_mb']:>10,}"
        )
    ratio = one_more["data_s"] / base["cold"]["data_s"]
    print(
        f"\nOne more {BATCH_ROWS:,}-image batch on {sizes[-1]}x: data stages {one_more['data_s']} s "
        f"({one_more['stages_s']}), {ratio:.2f}x the 1x cold data stages; peak RSS {one_more['peak_rss_mb']} MB"
    )
    verdict = {
        "data_memory_ok": all(p["cold"]["peak_rss_mb"] <= TARGETS["data_peak_rss_mb"] for p in points.values())
        and one_more["peak_rss_mb"] <= TARGETS["data_peak_rss_mb"],
        "training_memory_ok": all(
            p["training"]["peak_rss_mb"] - p["training"]["uint8_mb"] <= TARGETS["training_over_uint8_mb"]
            for p in points.values()
        ),
        "one_more_batch_ok": ratio <= TARGETS["one_more_batch_ratio"],
        "epoch_linear_ok": all(
            abs(v / per_image[sizes[0]] - 1) <= TARGETS["epoch_linearity"] for v in per_image.values()
        ),
    }
    print("targets: " + ", ".join(f"{k}={v}" for k, v in verdict.items()))
    if not args.work:
        shutil.rmtree(work)
    print(
        json.dumps(
            {"bench": "scale", "points": points, "one_more_batch": one_more, "one_more_batch_ratio": round(ratio, 3)}
            | {"targets": TARGETS, **verdict}
        )
    )


if __name__ == "__main__":
    main()
