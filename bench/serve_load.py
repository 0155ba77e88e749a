"""The prediction server under load, side by side in one run: REST and gRPC, 1 and 64 images a
request, 1/4/16/64 clients; the server's own compiled model call as the yardstick; and a hostile mix
(idle sockets, dripped bodies, maximal bodies) beside ordinary clients, with bodies parsed in worker
processes and, for comparison, on the event loop; the cost of feedback capture at 10%; and the edge
(nginx): its cost on ordinary traffic, the hostile mix with gRPC's attacks (half-open calls, held
messages, million-dimension shapes) through it and against the bare server, and what idle connections
cost it.

Starts `fashion-mnist serve` on the registry's champion (free loopback ports). Each client sends a
request as soon as the last is answered, for a fixed time. Prints images/s, p50/p99 latency and
errors for each cell, then one JSON line. Targets: no errors; under 16 hostile and 16 ordinary
clients the ordinary clients' p99 under 50 ms and /readyz answered within 1 s.

    .venv/bin/python bench/serve_load.py [--registry artifacts] [--seconds 5] [--capture-only --capture-rounds 4]
        [--edge-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' process helpers

from tests.attackers import attacker_address  # noqa: E402
from tests.processes import children, cmdline, free_ports, rss_bytes, stop, wait_until_ready  # noqa: E402

TARGET_P99_MS = 50.0
TARGET_READY_S = 1.0
CLIENTS = (1, 4, 16, 64)
BATCHES = (1, 64)
RAW_TEST_IMAGES = ROOT / "data" / "raw" / "t10k-images-idx3-ubyte"
PREDICT = "/v1/models/fashion-mnist:predict"


def test_images(count: int) -> np.ndarray:
    """Real test images when a run has put them in the data root; else random ones (same cost to serve)."""
    if RAW_TEST_IMAGES.exists():
        from fmnist.data.idx import IMAGES_MAGIC, read_idx

        return read_idx(RAW_TEST_IMAGES, IMAGES_MAGIC)[:count]
    return np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)


class Server:
    def __init__(self, registry: str, log: Path, *options: str) -> None:
        self.port, self.grpc_port = free_ports(2)
        command = [sys.executable, "-m", "fmnist.ops.cli", "--registry", registry, "serve"]
        command += ["--port", str(self.port), "--grpc-port", str(self.grpc_port), *options]
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_until_ready(f"http://127.0.0.1:{self.port}/readyz", self.process, log)
        except (RuntimeError, TimeoutError) as exc:
            stop(self.process)
            raise SystemExit(f"the server did not start: {exc}") from None

    def stop(self) -> None:
        stop(self.process)


def http_request(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head


async def rest_clients(port: int, requests: list[bytes], clients: int, seconds: float) -> tuple[list[float], int]:
    """Latencies (s) of the answered requests, and the failures, of `clients` keep-alive connections.

    Raw asyncio streams, not httpx: at about 1.1 ms of CPU a request httpx takes a whole core at 850
    requests/s, and the bench would measure the load generator instead of the server.
    """
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def one_client(first: int) -> None:
        nonlocal errors
        i = first
        while time.perf_counter() < end:  # a connection the server (or the edge) closes is opened again
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
            except OSError:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            try:
                while time.perf_counter() < end:
                    started = time.perf_counter()
                    writer.write(requests[i % len(requests)])
                    answer = await read_answer(reader)
                    if answer.startswith(b"HTTP/1.1 200 "):
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1
                    i += clients
                    if b"connection: close" in answer.lower():
                        break
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
            finally:
                writer.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return latencies, errors


async def grpc_clients(port: int, batches: list[np.ndarray], clients: int, seconds: float) -> tuple[list[float], int]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    requests = []
    for images in batches:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "fashion-mnist"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
        requests.append(request)
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        async def one_client(first: int) -> None:
            nonlocal errors
            i = first
            while time.perf_counter() < end:
                started = time.perf_counter()
                try:
                    await stub.Predict(requests[i % len(requests)], timeout=30)
                    latencies.append(time.perf_counter() - started)
                except grpc.RpcError:
                    errors += 1
                i += clients

        await asyncio.gather(*(one_client(c) for c in range(clients)))
    return latencies, errors


def figures(latencies: list[float], errors: int, seconds: float, images: int) -> dict:
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99)) if latencies else (float("nan"),) * 2
    rate = len(latencies) * images / seconds
    return {"images_per_s": round(rate, 1), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "errors": errors}


def matrix(server: Server, images: np.ndarray, seconds: float) -> list[dict]:
    rows = []
    for batch in BATCHES:
        groups = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)][:16]
        bodies = [http_request(PREDICT, json.dumps({"instances": g.tolist()}).encode()) for g in groups]
        for protocol in ("REST", "gRPC"):
            for clients in CLIENTS:
                if protocol == "REST":
                    run = rest_clients(server.port, bodies, clients, seconds)
                else:
                    run = grpc_clients(server.grpc_port, groups, clients, seconds)
                latencies, errors = asyncio.run(run)
                row = {"protocol": protocol, "images": batch, "clients": clients}
                rows.append({**row, **figures(latencies, errors, seconds, batch)})
                print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    label = f"{row['protocol']:5} {row['images']:>3} img/req {row['clients']:>3} clients"
    print(f"{label:32}{row['images_per_s']:>10.0f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['errors']:>8}")


def yardstick(registry: str, images: np.ndarray, seconds: float) -> dict:
    """Images a second through the compiled call the server makes, with no HTTP, at 1 and 64 a call."""
    from fmnist.data.cache import SCALED
    from fmnist.registry.versions import Registry
    from fmnist.serving.models import load_model
    from fmnist.storage.layout import StorageParams

    storage = StorageParams(registry_root=registry)
    reg = Registry.of(storage)
    predict, _ = load_model(reg, reg.champion_record())
    pixels = SCALED[images]
    rates = {}
    for batch in BATCHES:
        predict(pixels[:batch])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            start = (done * batch) % (len(pixels) - batch)
            predict(pixels[start : start + batch])
            done += 1
        rates[batch] = round(done * batch / (time.perf_counter() - started), 1)
    return rates


async def attack(port: int, hostile: int) -> None:
    """`hostile` clients until cancelled, from 127.0.0.2 and up: a third idle sockets, a third dripping
    bodies a byte every 50 ms, a third sending maximal bodies (8 MB of 2 million numbers, or 1,024 images
    of floats)."""
    maximal = http_request(PREDICT, b'{"instances": [' + b",".join([b"0.5"] * 2_000_000) + b"]}")
    valid = http_request(PREDICT, json.dumps({"instances": (np.full((1024, 784), 0.5)).tolist()}).encode())

    async def idle(n: int) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(attacker_address(n), 0))
                await reader.read()  # until the server's head deadline closes it
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    async def drip(n: int) -> None:
        body = json.dumps({"instances": [[[0] * 28] * 28]}).encode()
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(attacker_address(n), 0))
                writer.write(http_request(PREDICT, body)[: -len(body)])
                for i in range(len(body)):
                    writer.write(body[i : i + 1])
                    await asyncio.sleep(0.05)
                    if reader.at_eof():
                        break
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)

    async def big(n: int, request: bytes) -> None:
        while True:
            try:
                source = (attacker_address(n), 0)
                reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24, local_addr=source)
                writer.write(request)
                await read_answer(reader)
                writer.close()
            except (OSError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.05)

    third = hostile // 3
    attackers = [idle(i) for i in range(third)] + [drip(third + i) for i in range(third)]
    attackers += [big(2 * third + i, maximal if i % 2 else valid) for i in range(hostile - 2 * third)]
    await asyncio.gather(*attackers)


def grpc_attack(grpc_address: str, stop_at: float) -> None:
    """gRPC attackers in threads, until `stop_at`: 256 half-open calls (16 connections of 16 streams,
    opened again as they are cut off), maximal messages held almost complete, and PredictRequests whose
    tensor claims about 900,000 dimensions."""
    from tests.attackers import H2Client, grpc_frame, huge_shape_predict

    def half_open(n: int) -> None:
        while time.monotonic() < stop_at:
            try:
                client = H2Client.open(attacker_address(100 + n), grpc_address)
                for _ in range(16):
                    client.start_call()
                while not client.closed and time.monotonic() < stop_at:
                    client.read(0.5)
                client.close()
            except OSError:
                time.sleep(0.1)

    def held(n: int) -> None:
        size = (4 << 20) - 64
        while time.monotonic() < stop_at:
            try:
                client = H2Client.open(attacker_address(150 + n), grpc_address)
                client.send(client.start_call(), grpc_frame(b"\x00" * (size - 1024), declared=size), deadline_s=3)
                while not client.closed and time.monotonic() < stop_at:
                    client.read(0.5)
                client.close()
            except OSError:
                time.sleep(0.1)

    def shapes(n: int) -> None:
        message = grpc_frame(huge_shape_predict(900_000))
        while time.monotonic() < stop_at:
            try:
                client = H2Client.open(attacker_address(200 + n), grpc_address)
                client.send(client.start_call(), message, end=True, deadline_s=5)
                client.read(2.0)
                client.close()
            except OSError:
                time.sleep(0.1)

    threads = [threading.Thread(target=f, args=(n,), daemon=True) for f in (half_open,) for n in range(16)]
    threads += [threading.Thread(target=f, args=(n,), daemon=True) for f in (held, shapes) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(stop_at - time.monotonic(), 0) + 10)


def attacker(port: int, hostile: int, grpc_address: str | None = None, seconds: float = 3600) -> None:
    # A process of its own at a lower priority: the attackers would be other machines, and on this
    # one they must not take the CPU the server and the ordinary clients are measured on.
    os.nice(10)
    if grpc_address:
        threading.Thread(target=grpc_attack, args=(grpc_address, time.monotonic() + seconds), daemon=True).start()
    asyncio.run(attack(port, hostile))


async def ordinary_mix(
    port: int, ordinary: list[bytes], seconds: float, grpc_port: int | None = None, images: np.ndarray | None = None
) -> dict:
    """16 ordinary one-image clients and /readyz polled every 100 ms: their figures, and the slowest /readyz;
    with `grpc_port`, 4 one-image gRPC clients beside them (their p99 and failures)."""
    end = time.perf_counter() + seconds

    async def readiness() -> float:
        slowest = 0.0
        while time.perf_counter() < end:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            await read_answer(reader)
            writer.close()
            slowest = max(slowest, time.perf_counter() - started)
            await asyncio.sleep(0.1)
        return slowest

    if grpc_port is None:
        (latencies, errors), slowest = await asyncio.gather(rest_clients(port, ordinary, 16, seconds), readiness())
        return {**figures(latencies, errors, seconds, 1), "readyz_max_ms": round(slowest * 1000, 1)}
    groups = [images[i : i + 1] for i in range(64)]
    (latencies, errors), slowest, (grpc_latencies, grpc_errors) = await asyncio.gather(
        rest_clients(port, ordinary, 16, seconds), readiness(), grpc_clients(grpc_port, groups, 4, seconds)
    )
    grpc = figures(grpc_latencies, grpc_errors, seconds, 1)
    return {
        **figures(latencies, errors, seconds, 1),
        "readyz_max_ms": round(slowest * 1000, 1),
        "grpc_p99_ms": grpc["p99_ms"],
        "grpc_errors": grpc["errors"],
    }


def hostile_mix(
    port: int,
    ordinary: list[bytes],
    seconds: float,
    hostile: int,
    grpc_port: int | None = None,
    images: np.ndarray | None = None,
) -> dict:
    """Ordinary clients alone or beside `hostile` attackers (REST; and gRPC's attacks with `grpc_port`)."""
    attack_process = None
    if hostile:
        grpc_address = f"127.0.0.1:{grpc_port}" if grpc_port else None
        args = (port, hostile, grpc_address, seconds + 5)
        attack_process = multiprocessing.get_context("spawn").Process(target=attacker, args=args)
        attack_process.start()
        time.sleep(3.0)  # the attack under way first (the process imports numpy, builds its bodies)
    try:
        return asyncio.run(ordinary_mix(port, ordinary, seconds, grpc_port, images))
    finally:
        if attack_process:
            attack_process.terminate()
            attack_process.join()


def capture_cost(
    registry: str, ordinary: list[bytes], seconds: float, rounds: int, scratch: Path
) -> tuple[dict[str, list[dict]], int]:
    """Feedback capture's cost: 10% of the images kept, side by side with capture off, alternating, each
    on a fresh server; the runs of each, and the record files capture wrote."""
    capture = ("--capture-rate", "0.1", "--data-root", str(scratch / "data"))
    captures: dict[str, list[dict]] = {"capture off": [], "capture at 10%": []}
    for _ in range(rounds):
        for name, options in (("capture off", ()), ("capture at 10%", capture)):
            server = Server(registry, scratch / "serve-capture.log", *options)
            try:
                asyncio.run(rest_clients(server.port, ordinary, 16, 1.0))
                captures[name].append(asyncio.run(ordinary_mix(server.port, ordinary, seconds)))
            finally:
                server.stop()
    return captures, len(list((scratch / "data" / "feedback" / "records").glob("*.parquet")))


def print_capture_cost(captures: dict[str, list[dict]], kept: int) -> dict[str, dict]:
    medians = {}
    for name, runs in captures.items():
        mix = {k: round(float(np.median([r[k] for r in runs])), 2) for k in runs[0]}
        medians[name] = mix
        print(
            f"{name + f' (median of {len(runs)})':44}{mix['images_per_s']:>10.0f}{mix['p50_ms']:>9.1f}"
            f"{mix['p99_ms']:>9.1f}{mix['errors']:>8.0f}{mix['readyz_max_ms']:>15.1f}"
        )
    on, off = medians["capture at 10%"]["images_per_s"], medians["capture off"]["images_per_s"]
    print(f"Capture wrote {kept} record files; throughput with capture at 10%: {on / off:.2f}x capture off")
    return medians


def app_ports(log: Path) -> tuple[int, int]:
    """The loopback ports of the server behind the edge, as its log names them."""
    text = log.read_text()
    rest = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
    grpc = re.search(r"reflection\) on 127\.0\.0\.1:(\d+)", text)
    if not (rest and grpc):
        raise SystemExit(f"the server behind the edge did not log its ports:\n{text[-2000:]}")
    return int(rest.group(1)), int(grpc.group(1))


def idle_connection_cost(port: int, edge_workers: list[int], count: int) -> dict:
    """nginx's memory for `count` idle connections (from attacker addresses): its processes' RSS before and
    while they are held."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(count, hard - 256)
    before = sum(rss_bytes(pid) for pid in edge_workers) >> 10
    held = []
    try:
        for n in range(count):
            connection = socket.socket()
            connection.bind((attacker_address(n), 0))
            connection.connect(("127.0.0.1", port))
            held.append(connection)
        time.sleep(0.5)
        during = sum(rss_bytes(pid) for pid in edge_workers) >> 10
    finally:
        for connection in held:
            connection.close()
    return {"connections": count, "edge_rss_kib_before": before, "edge_rss_kib_held": during}


def edge_figures(registry: str, images: np.ndarray, ordinary: list[bytes], seconds: float, hostile: int) -> dict:
    """The edge's cost on ordinary traffic and what it holds off: one server started with --edge, measured
    through the edge and directly on its loopback ports (the bare server), cell by cell side by side."""
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-edge-"))
    server = Server(registry, logs / "serve.log", "--edge")
    bare_rest, bare_grpc = app_ports(logs / "serve.log")
    doors = {"edge": (server.port, server.grpc_port), "bare": (bare_rest, bare_grpc)}
    rows, mixes = [], {}
    try:
        asyncio.run(rest_clients(server.port, ordinary, 16, 2.0))
        for batch in BATCHES:
            groups = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)][:16]
            bodies = [http_request(PREDICT, json.dumps({"instances": g.tolist()}).encode()) for g in groups]
            for protocol in ("REST", "gRPC"):
                for door, (rest, grpc) in doors.items():
                    run = rest_clients(rest, bodies, 16, seconds) if protocol == "REST" else None
                    run = run or grpc_clients(grpc, groups, 16, seconds)
                    latencies, errors = asyncio.run(run)
                    row = {"door": door, "protocol": protocol, "images": batch, "clients": 16}
                    rows.append({**row, **figures(latencies, errors, seconds, batch)})
                    print(f"{door:5}", end=" ")
                    print_row(rows[-1])
        for door, (rest, grpc) in doors.items():
            name = f"{door}, beside {hostile} REST and 24 gRPC attackers"
            mixes[name] = hostile_mix(rest, ordinary, 2 * seconds, hostile, grpc, images)
        edge = [pid for pid in children(server.process.pid) if b"nginx" in cmdline(pid)]
        idle = idle_connection_cost(server.port, edge + [w for m in edge for w in children(m)], 10_000)
    finally:
        server.stop()
    print(f"\n16 ordinary REST clients and 4 gRPC clients, one image a request, {2 * seconds:g} s:")
    header = (
        f"{'':56}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'readyz max':>12}{'gRPC p99':>10}{'errors':>8}"
    )
    print(header)
    for name, mix in mixes.items():
        print(
            f"{name:56}{mix['images_per_s']:>10.0f}{mix['p50_ms']:>9.1f}{mix['p99_ms']:>9.1f}{mix['errors']:>8}"
            f"{mix['readyz_max_ms']:>12.1f}{mix['grpc_p99_ms']:>10.1f}{mix['grpc_errors']:>8}"
        )
    held_kib = idle["edge_rss_kib_held"] - idle["edge_rss_kib_before"]
    print(f"{idle['connections']:,} idle connections held by the edge: +{held_kib / 1024:.1f} MiB of nginx RSS")
    for protocol in ("REST", "gRPC"):
        for batch in BATCHES:
            edge, bare = (
                next(r for r in rows if (r["door"], r["protocol"], r["images"]) == (d, protocol, batch))
                for d in ("edge", "bare")
            )
            ratio = edge["images_per_s"] / bare["images_per_s"] if bare["images_per_s"] else float("nan")
            print(f"{protocol} {batch} img/req, 16 clients: the edge gives {ratio:.2f}x the bare server's images/s")
    shutil.rmtree(logs, ignore_errors=True)
    return {"matrix": rows, "hostile": mixes, "idle": idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="artifacts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hostile", type=int, default=16)
    parser.add_argument("--capture-rounds", type=int, default=2, help="alternations of capture off and on")
    parser.add_argument("--capture-only", action="store_true", help="measure only what capture costs")
    parser.add_argument(
        "--edge-only", action="store_true", help="measure only the edge: its cost and what it holds off"
    )
    args = parser.parse_args()

    images = test_images(1024)
    ordinary = [http_request(PREDICT, json.dumps({"instances": [i.tolist()]}).encode()) for i in images[:256]]
    if args.edge_only:
        print(f"{'':38}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
        edge = edge_figures(args.registry, images, ordinary, args.seconds, args.hostile)
        print(json.dumps({"bench": "serve_load", "edge": edge}))
        return
    logs = tempfile.TemporaryDirectory(prefix="serve-bench-")
    if args.capture_only:
        print(f"16 ordinary clients, one image a request, {2 * args.seconds:g} s a run:")
        captures, kept = capture_cost(args.registry, ordinary, 2 * args.seconds, args.capture_rounds, Path(logs.name))
        print(json.dumps({"bench": "serve_load", "capture": print_capture_cost(captures, kept)}))
        logs.cleanup()
        return
    print(f"{'':32}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    server = Server(args.registry, Path(logs.name) / "serve.log")
    try:
        asyncio.run(rest_clients(server.port, ordinary, 16, 2.0))  # warm-up: the server's first batches
        rows = matrix(server, images, args.seconds)
        mixes = {}
        for name, hostile in (("ordinary alone", 0), (f"beside {args.hostile} hostile", args.hostile)):
            mixes[name] = hostile_mix(server.port, ordinary, 2 * args.seconds, hostile)
    finally:
        server.stop()
    event_loop = Server(args.registry, Path(logs.name) / "serve-inline.log", "--parse-workers", "0")
    try:
        name = f"beside {args.hostile} hostile, parsed on the loop"
        mixes[name] = hostile_mix(event_loop.port, ordinary, 2 * args.seconds, args.hostile)
    finally:
        event_loop.stop()
    captures, kept = capture_cost(args.registry, ordinary, 2 * args.seconds, args.capture_rounds, Path(logs.name))
    logs.cleanup()
    call = yardstick(args.registry, images, args.seconds)

    print(f"{'compiled call, 1 img/call':32}{call[1]:>10.0f}")
    print(f"{'compiled call, 64 img/call':32}{call[64]:>10.0f}")
    print(f"\n16 ordinary clients, one image a request, {2 * args.seconds:g} s:")
    print(f"{'':44}{'images/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'readyz max ms':>15}")
    for name, mix in mixes.items():
        print(
            f"{name:44}{mix['images_per_s']:>10.0f}{mix['p50_ms']:>9.1f}{mix['p99_ms']:>9.1f}{mix['errors']:>8}"
            f"{mix['readyz_max_ms']:>15.1f}"
        )
    mixes |= print_capture_cost(captures, kept)
    under_attack = mixes[f"beside {args.hostile} hostile"]
    meets = under_attack["p99_ms"] < TARGET_P99_MS and under_attack["readyz_max_ms"] < TARGET_READY_S * 1000
    verdict = "meets" if meets and not under_attack["errors"] else "misses"
    print(f"Under attack: {verdict} the target (p99 < {TARGET_P99_MS:g} ms, /readyz < {TARGET_READY_S:g} s, no errors)")
    for batch in BATCHES:
        best = max(r["images_per_s"] for r in rows if r["images"] == batch and r["protocol"] == "REST")
        print(f"Best REST at {batch} img/req: {best / call[batch]:.2f}x the compiled call at {batch} img/call")
    print("\nThe edge (nginx) in front, against the bare server behind it:")
    edge = edge_figures(args.registry, images, ordinary, args.seconds, args.hostile)
    print(json.dumps({"bench": "serve_load", "matrix": rows, "compiled_call": call, "hostile": mixes, "edge": edge}))


if __name__ == "__main__":
    main()
