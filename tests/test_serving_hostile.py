"""Clients that would lock others out, against a real server process over raw sockets: idle
connections, request heads and bodies dripped a byte at a time, uploads held almost complete. Each
is cut off (a 408 and a closed connection, or a 429 beyond the byte budget), the server's memory
stays within its budget, and ordinary clients are answered throughout."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fmnist.registry.versions import Registry
from tests.serving_helpers import PREDICT, RunningServer, image_rows, running_server, two_version_registry

pytestmark = pytest.mark.training

HEADER_S, BODY_S, BUDGET_MIB, CONNECTIONS = 1.0, 2.0, 40, 32
ONE_IMAGE = json.dumps({"instances": [image_rows(0)]}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    registry: Registry = two_version_registry(tmp_path_factory.mktemp("hostile"))
    options = (
        *("--header-timeout-s", str(HEADER_S), "--body-timeout-s", str(BODY_S)),
        *("--max-body-mib-in-flight", str(BUDGET_MIB), "--max-connections", str(CONNECTIONS)),
    )
    with running_server(registry.root, tmp_path_factory.mktemp("server") / "serve.log", None, *options) as running:
        yield running


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=15)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    return connection


def until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def drip(connection: socket.socket, data: bytes, step: int, pause_s: float, first: bytes = b"") -> tuple[bytes, int]:
    """Send `first`, then `data` `step` bytes every `pause_s`, until the server answers; what it sent
    until it closed the connection, and how many bytes of `data` went."""
    sent, answer = 0, b""
    try:
        connection.sendall(first)
        connection.settimeout(pause_s)
        while sent < len(data) and not answer:
            connection.sendall(data[sent : sent + step])
            sent += step
            try:
                answer = connection.recv(65536)
            except TimeoutError:
                continue
        connection.settimeout(15)
        return answer + until_closed(connection), sent
    finally:
        connection.close()


def ordinary_request(server: RunningServer) -> int:
    return httpx.post(f"{server.url}{PREDICT}", content=ONE_IMAGE, timeout=15).status_code


def rss_bytes(server: RunningServer) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_idle_connections_are_closed_at_the_head_deadline_and_lock_no_one_out(server: RunningServer) -> None:
    idle = [connect(server) for _ in range(CONNECTIONS - 1)]  # all but one of the connections allowed, silent
    try:
        time.sleep(0.2)
        for connection in idle:
            answer = until_closed(connection)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"no complete request head within 1 s" in answer
    finally:
        for connection in idle:
            connection.close()
    assert ordinary_request(server) == 200


def test_at_the_connection_limit_silent_connections_make_room_for_a_request(server: RunningServer) -> None:
    idle = [connect(server) for _ in range(CONNECTIONS)]  # every connection the server allows, silent
    try:
        time.sleep(0.2)
        assert ordinary_request(server) == 200  # before the head deadline: the oldest silent one made room
        answers = [until_closed(connection) for connection in idle]
    finally:
        for connection in idle:
            connection.close()
    evicted = [a for a in answers if b"at its connection limit" in a]
    assert evicted and all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert answers[0] in evicted  # the longest open


def test_a_head_dripped_a_byte_at_a_time_is_cut_off(server: RunningServer) -> None:
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + b"X-Pad: " + b"a" * 400
    )
    answer, sent = drip(connect(server), head, step=1, pause_s=0.1)
    assert sent < len(head), "the server waited for the whole dripped head"
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_body_dripped_slowly_gets_a_408_and_the_connection_is_closed(server: RunningServer) -> None:
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(ONE_IMAGE)}\r\n\r\n"
    answer, sent = drip(connect(server), ONE_IMAGE, step=8, pause_s=0.3, first=head.encode())
    assert sent < len(ONE_IMAGE), "the server waited for the whole dripped body"
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"the body was not in within 2 s" in answer


def whole_answer(connection: socket.socket) -> bytes:
    """An answer's head and its body (a recv may return the head alone)."""
    answer = connection.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head, re.I)
    while length and len(body) < int(length.group(1)):
        more = connection.recv(65536)
        if not more:
            break
        body += more
    return head + b"\r\n\r\n" + body if length else answer


def test_held_uploads_stay_within_the_byte_budget_and_ordinary_clients_are_answered(server: RunningServer) -> None:
    """Twelve clients each try to hold a 15 MB body, almost complete: 180 MB against a 40 MiB budget."""
    body_size, held_clients = 15_000_000, 12
    before = rss_bytes(server)
    answers: list[bytes] = []
    held: list[socket.socket] = []
    lock = threading.Lock()

    def hold(chunked: bool) -> None:
        connection = connect(server)
        with lock:
            held.append(connection)
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {body_size}"
        connection.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n".encode())
        block = b" " * (1 << 20)
        try:
            for _ in range(body_size // len(block)):
                connection.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            connection.settimeout(BODY_S * 4)
            answer = whole_answer(connection)  # refused (429) at once, or a 408 at the body deadline
        except OSError as exc:  # refused while sending: the server closed after its 429
            answer = f"closed while sending ({exc})".encode()
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=hold, args=(i % 2 == 1,)) for i in range(held_clients)]
    for thread in threads:
        thread.start()
    peak = before
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, rss_bytes(server))
        assert ordinary_request(server) in (200, 429)
        time.sleep(0.05)
    for connection in held:
        connection.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 429 ")]
    assert refused and b"budget" in refused[0], answers[:3]
    assert all(a.startswith((b"HTTP/1.1 429 ", b"HTTP/1.1 408 ", b"closed while sending")) for a in answers), answers
    # The bodies held at once cost at most twice the budget (each is read in chunks, then joined).
    assert peak - before < 2 * (BUDGET_MIB << 20), f"RSS grew {(peak - before) >> 20} MiB"
    assert ordinary_request(server) == 200
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    metrics = httpx.get(f"{server.url}/monitoring/prometheus/metrics").text
    assert 'fashion_mnist_refusals_total{reason="busy"}' in metrics
    assert "fashion_mnist_body_bytes_in_flight 0.0" in metrics  # every byte given back
