"""Data stages on the real data: seconds per stage cold (empty data root) and warm (all cached).

Each scenario runs in a fresh process so its peak memory is its own. Library imports are timed
apart from the stages: GX alone takes several seconds to import, once per process, whatever the
data. Prints a table, then one JSON line.

    .venv/bin/python bench/data_stages.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"cold_s": 5.0, "warm_s": 1.0, "peak_rss_mb": 1500}
STAGES = ("download", "collect_incoming", "validate", "normalize_cache")


def run_stages(root: Path, cold: bool) -> dict:
    started = time.perf_counter()
    from fmnist.data.dataset import DEFAULT_MIRRORS, FASHION_MNIST
    from fmnist.data.download import download_dataset
    from fmnist.data.incoming import collect_incoming
    from fmnist.data.normalization import normalize_and_cache
    from fmnist.data.validation import validate_raw
    from fmnist.storage import Store
    from fmnist.storage.layout import DataLayout

    if cold:
        import great_expectations  # noqa: F401  (imported by validation on a miss; timed apart)
    imports = time.perf_counter() - started

    layout, store = DataLayout(str(root)), Store()
    seconds = {}

    def timed(name, fn):
        t = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - t
        return result

    raw = timed("download", lambda: download_dataset(FASHION_MNIST, DEFAULT_MIRRORS[:1], store, layout.raw))
    incoming = timed("collect_incoming", lambda: collect_incoming(store, str(root / "incoming")))
    report = timed("validate", lambda: validate_raw(FASHION_MNIST, raw, incoming, store, layout.validation))
    cached = timed(
        "normalize_cache",
        lambda: normalize_and_cache(FASHION_MNIST, raw, incoming, report, store, layout),
    )
    assert report.success and cached.train_rows == 60_000
    assert (raw.train_images.source == "cache") is not cold and report.reused is not cold and cached.reused is not cold
    return {
        "imports_s": imports,
        "stages_s": seconds,
        "total_s": sum(seconds.values()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def scenario(root: Path, phase: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", phase, "--root", str(root)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["cold", "warm"])
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_stages(args.root, cold=args.child == "cold")))
        return

    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "data"
            runs["cold"].append(scenario(root, "cold"))
            runs["warm"].append(scenario(root, "warm"))

    summary = {}
    print(f"Data stages on the real data, median of {args.repeats} runs (seconds)")
    print(f"{'':10}" + "".join(f"{s:>18}" for s in STAGES) + f"{'total':>10}{'imports':>10}{'peak MB':>10}")
    for phase, results in runs.items():
        med = {s: statistics.median(r["stages_s"][s] for r in results) for s in STAGES}
        total = statistics.median(r["total_s"] for r in results)
        imports = statistics.median(r["imports_s"] for r in results)
        peak = max(r["peak_rss_mb"] for r in results)
        summary[phase] = {"stages_s": med, "total_s": total, "imports_s": imports, "peak_rss_mb": peak}
        print(
            f"{phase:10}" + "".join(f"{med[s]:>18.3f}" for s in STAGES) + f"{total:>10.3f}{imports:>10.2f}{peak:>10.0f}"
        )
    peak = max(summary["cold"]["peak_rss_mb"], summary["warm"]["peak_rss_mb"])
    verdict = {
        "cold_ok": summary["cold"]["total_s"] <= TARGETS["cold_s"],
        "warm_ok": summary["warm"]["total_s"] <= TARGETS["warm_s"],
        "memory_ok": peak <= TARGETS["peak_rss_mb"],
    }
    print(
        f"targets: cold <= {TARGETS['cold_s']} s, warm <= {TARGETS['warm_s']} s, peak <= {TARGETS['peak_rss_mb']} MB; "
        + ", ".join(f"{k}={v}" for k, v in verdict.items())
    )
    print(json.dumps({"bench": "data_stages", "repeats": args.repeats, **summary, "targets": TARGETS, **verdict}))


if __name__ == "__main__":
    main()
