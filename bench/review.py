"""Review on a full feedback folder: peak memory of choosing an offer, against reading every record
whole (what review did before), and how fast submits drain a full folder.

Each measurement runs in a fresh process so its peak memory is its own. The folder holds `--files`
record files of RECORDS_PER_FILE records (capture's own writer format). Prints a table, then one JSON
line.

    .venv/bin/python bench/review.py [--files 100]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def fill(feedback: str, files: int) -> None:
    import numpy as np
    import pyarrow as pa

    from fmnist.data.captured import PIXELS, RECORDS_PER_FILE, SCHEMA, encode, record_file_name, records_folder
    from fmnist.storage import Store, join

    store, rng = Store(), np.random.default_rng(0)
    for _ in range(files):
        n = RECORDS_PER_FILE
        data = {
            "id": [f"{i:032x}" for i in rng.integers(0, 2**62, n)],
            "request": ["r" * 32] * n,
            "at": ["2026-12-06T00:00:00.000+00:00"] * n,
            "version": ["v0001"] * n,
            "label": ["stable"] * n,
            "predicted": rng.integers(0, 10, n).astype(np.int8),
            "confidence": rng.random(n).astype(np.float32),
            "image": [rng.integers(0, 256, PIXELS, dtype=np.uint8).tobytes() for _ in range(n)],
        }
        store.write_bytes(join(records_folder(feedback), record_file_name(n)), encode(pa.table(data, schema=SCHEMA)))


def measure(kind: str, feedback: str, out: str) -> dict:
    """One measurement, in this process: seconds and peak RSS."""
    import io

    import pyarrow.parquet as pq

    from fmnist.data.captured import record_files, records_folder
    from fmnist.ops.review import MAX_REVIEW, compact_records, make_review, submit_review
    from fmnist.storage import Store, join

    store = Store()
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if kind == "whole":  # every record as a dict, sorted: review before it streamed
        rows = []
        for name in record_files(store, feedback):
            rows += pq.read_table(io.BytesIO(store.read_bytes(join(records_folder(feedback), name)))).to_pylist()
        rows.sort(key=lambda r: (r["confidence"], r["at"], r["id"]))
        offered = len(rows[:MAX_REVIEW])
    elif kind == "streamed":
        offered = make_review(store, feedback, Path(out)).images
    else:  # "submit": submit the streamed review, and free its records' space
        submit_review(store, feedback, Path(out), str(Path(feedback).parent / "incoming"), "bench", None)
        freed = compact_records(store, feedback)
        offered = freed.records_freed
    took = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "kind": kind,
        "s": round(took, 2),
        "peak_rss_mb": round(peak_mb),
        "above_start_mb": round(peak_mb - base_mb),
        "n": offered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "FEEDBACK", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    scratch = Path(tempfile.mkdtemp(prefix="fmnist-bench-review-"))
    try:
        feedback = str(scratch / "feedback")
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        fill(feedback, args.files)
        out = str(scratch / "review")
        results = {}
        for kind in ("whole", "streamed", "submit"):
            command = [sys.executable, __file__, "--measure", kind, feedback, out]
            results[kind] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        from fmnist.data.captured import RECORDS_PER_FILE

        records = args.files * RECORDS_PER_FILE
        print(f"{'':10} {'seconds':>8} {'peak MiB':>9} {'above start':>12}")
        for kind, r in results.items():
            print(f"{kind:10} {r['s']:8.2f} {r['peak_rss_mb']:9} {r['above_start_mb']:12}")
        ratio = results["whole"]["above_start_mb"] / max(results["streamed"]["above_start_mb"], 1)
        submit = results["submit"]
        print(
            f"{records:,} records in {args.files} files: choosing the offer streamed grows memory {ratio:.1f}x less "
            f"than reading them whole; one submit frees {submit['n']:,} records in {submit['s']} s"
        )
        print(json.dumps({"records": records, "files": args.files, **results, "memory_ratio": round(ratio, 1)}))
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
