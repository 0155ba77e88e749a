"""The prediction server under load, against bare loops over the same images.

Starts `fashion-mnist serve` on the registry's champion (on a free loopback port), then N concurrent
clients, each sending single-image TF Serving predict requests one after another for a fixed time;
then, in this process with the server stopped, the same images one image a call for the same time:
through `model.predict` (the yardstick) and through the compiled call the server makes. Prints
requests/s, images/s, p50/p99 latency, errors, and the ratio of the server's images/s to the
`model.predict` loop's, then one JSON line. Target: at 16 clients, a ratio of at least 0.5 with p99
under 50 ms and no errors.

    .venv/bin/python bench/serve_load.py [--registry artifacts] [--clients 16] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' process helpers

from tests.processes import free_ports, stop, wait_until_ready  # noqa: E402

TARGET_RATIO = 0.5
TARGET_P99_MS = 50.0
RAW_TEST_IMAGES = ROOT / "data" / "raw" / "t10k-images-idx3-ubyte"


def test_images(count: int) -> np.ndarray:
    """Real test images when a run has put them in the data root; else random ones (same cost to serve)."""
    if RAW_TEST_IMAGES.exists():
        from fmnist.data.idx import read_idx

        return read_idx(RAW_TEST_IMAGES)[:count]
    return np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def start_server(registry: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "fmnist.ops.cli", "--registry", registry, "serve", "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", process, log)
    except (RuntimeError, TimeoutError) as exc:
        stop(process)
        raise SystemExit(f"the server did not start: {exc}") from None
    return process


async def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> tuple[list[float], int, float]:
    """Latencies (s) of the answered requests, the failures, and the wall time, of `clients` clients.

    Each client is one keep-alive HTTP/1.1 connection on asyncio streams, sending a request as soon as
    the last is answered. Not httpx: at about 1.1 ms of CPU a request it takes a whole core at 850
    requests/s on this machine, and the bench would measure the load generator instead of the server.
    """
    requests = [
        b"POST /v1/models/fashion-mnist:predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for body in bodies
    ]
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def one_client(first: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = first
        try:
            while time.perf_counter() < end:
                started = time.perf_counter()
                writer.write(requests[i % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if head.startswith(b"HTTP/1.1 200 "):
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1
                i += clients
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return latencies, errors, time.perf_counter() - started


def bare_rates(registry: str, images: np.ndarray, seconds: float) -> tuple[float, float]:
    """Images a second, one image a call, on the same images: through `model.predict` (the yardstick),
    and through the compiled call the server makes (what one image costs without HTTP or batching)."""
    from fmnist.data.cache import normalize
    from fmnist.registry.versions import Registry
    from fmnist.serving.server import load_served
    from fmnist.storage.layout import StorageParams
    from fmnist.training.model import load_verified_model

    storage = StorageParams(registry_root=registry)
    reg = Registry(storage.store(), storage.registry)
    model = load_verified_model(reg.store, reg.champion_model())
    compiled = load_served(reg, reg.champion_record()).predict
    pixels = normalize(images).reshape(images.shape)

    def rate(call) -> float:
        call(pixels[:1])  # traced before the clock starts
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            call(pixels[done % len(pixels) : done % len(pixels) + 1])
            done += 1
        return done / (time.perf_counter() - started)

    return rate(lambda x: model.predict(x, verbose=0)), rate(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="artifacts")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    images = test_images(1000)
    bodies = [json.dumps({"instances": [image.tolist()]}).encode() for image in images]
    [port] = free_ports(1)
    logs = tempfile.TemporaryDirectory(prefix="serve-bench-")
    server = start_server(args.registry, port, Path(logs.name) / "serve.log")
    try:
        asyncio.run(load(port, bodies, args.clients, 2.0))  # warm-up: the server's first batches
        latencies, errors, wall_s = asyncio.run(load(port, bodies, args.clients, args.seconds))
        version = httpx.get(f"http://127.0.0.1:{port}/readyz").json()["version"]
    finally:
        stop(server)
        logs.cleanup()
    bare, bare_call = bare_rates(args.registry, images, args.seconds)

    served = len(latencies) / wall_s
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99)) if latencies else (float("nan"),) * 2
    ratio = served / bare
    print(f"Champion {version} of {args.registry}; {args.clients} clients, single-image requests, {args.seconds:g} s")
    print(f"{'':28}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    print(f"{'server (requests = images)':28}{served:>10.0f}{p50:>9.1f}{p99:>9.1f}{errors:>8}")
    print(f"{'bare model.predict loop':28}{bare:>10.0f}")
    print(f"{'bare compiled call loop':28}{bare_call:>10.0f}")
    verdict = "meets" if ratio >= TARGET_RATIO and p99 < TARGET_P99_MS and errors == 0 else "misses"
    print(
        f"Server / bare loop: {ratio:.2f}x ({verdict} the target: >= {TARGET_RATIO}x, p99 < {TARGET_P99_MS:g} ms, "
        "no errors)"
    )
    figures = {
        "bench": "serve_load",
        "version": version,
        "clients": args.clients,
        "seconds": args.seconds,
        "requests_per_s": round(served, 1),
        "images_per_s": round(served, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "errors": errors,
        "bare_predict_images_per_s": round(bare, 1),
        "bare_call_images_per_s": round(bare_call, 1),
        "ratio": round(ratio, 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
