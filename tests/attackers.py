"""Clients that try to lock a server out, from other loopback addresses than ordinary clients (Linux
routes all of 127.0.0.0/8 to loopback), as on a real network: raw HTTP/1.1 sockets, and raw HTTP/2
(gRPC) connections through the `h2` state machine, which can send what no gRPC client would: headers
with no message, a message declared and never finished, a shape with a million dimensions.

Used by the hostile tests and by `bench/serve_load.py`'s hostile mix. Every loop is bounded.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"


def attacker_address(number: int) -> str:
    """127.0.0.2 and up: never the ordinary clients' 127.0.0.1."""
    return f"127.0.0.{2 + number % 250}"


def connect_from(source: str, host: str, port: int, timeout_s: float = 15) -> socket.socket:
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.settimeout(timeout_s)
    connection.bind((source, 0))
    connection.connect((host, port))
    return connection


def split(address: str) -> tuple[str, int]:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def grpc_frame(message: bytes, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message (uncompressed); `declared` may lie about its length."""
    return b"\x00" + struct.pack(">I", len(message) if declared is None else declared) + message


def huge_shape_predict(dimensions: int) -> bytes:
    """A serialized PredictRequest whose `images` tensor claims `dimensions` dimensions (protobuf by hand:
    the attacker's tool is not the server's library)."""

    def key(number: int, wire: int) -> bytes:
        return varint(number << 3 | wire)

    def length_delimited(number: int, payload: bytes) -> bytes:
        return key(number, 2) + varint(len(payload)) + payload

    dim = length_delimited(2, key(1, 0) + varint(1))  # TensorShapeProto.dim { size: 1 }
    shape = dim * dimensions
    tensor = key(1, 0) + varint(4) + length_delimited(2, shape)  # dtype DT_UINT8, tensor_shape
    entry = length_delimited(1, b"images") + length_delimited(2, tensor)  # map<string, TensorProto> entry
    spec = length_delimited(1, length_delimited(1, b"fashion-mnist"))  # model_spec { name }
    return spec + length_delimited(2, entry)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@dataclass
class H2Client:
    """One raw HTTP/2 connection to a gRPC port."""

    sock: socket.socket
    conn: h2.connection.H2Connection = field(
        default_factory=lambda: h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    )
    closed: bool = False
    backlog: list = field(default_factory=list)  # events that arrived while sending, for the next `read`

    @classmethod
    def open(cls, source: str, address: str) -> H2Client:
        client = cls(connect_from(source, *split(address)))
        client.conn.initiate_connection()
        client.flush()
        return client

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def start_call(self, method: str = PREDICT_METHOD) -> int:
        """Headers of a gRPC call, and nothing else: the call waits for its message."""
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "server"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        self.conn.send_headers(stream, headers)
        self.flush()
        return stream

    def send(self, stream: int, data: bytes, end: bool = False, deadline_s: float = 10) -> int:
        """Send what flow control allows of `data` within `deadline_s`; how many bytes went."""
        sent, deadline = 0, time.monotonic() + deadline_s
        while sent < len(data) and time.monotonic() < deadline and not self.closed:
            window = min(self.conn.local_flow_control_window(stream), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.backlog += self._receive(0.2)
                continue
            chunk = data[sent : sent + window]
            try:
                self.conn.send_data(stream, chunk, end_stream=end and sent + len(chunk) == len(data))
            except h2.exceptions.ProtocolError:  # the server reset the stream: it was cut off
                break
            sent += len(chunk)
            try:
                self.flush()
            except OSError:
                self.closed = True
        return sent

    def read(self, timeout_s: float) -> list:
        """The events that arrived while sending, and those that arrive within `timeout_s`."""
        events, self.backlog = self.backlog, []
        return events + self._receive(timeout_s)

    def _receive(self, timeout_s: float) -> list:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return []
        except OSError:
            self.closed = True
            return []
        if not data:
            self.closed = True
            return []
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return []
        self.flush()
        return events

    def close(self) -> None:
        self.sock.close()


def grpc_status(events: list) -> str | None:
    """The grpc-status of the first answer among `events`, if one came."""
    for event in events:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            headers = {k.decode() if isinstance(k, bytes) else k: v for k, v in event.headers}
            status = headers.get("grpc-status")
            if status is not None:
                return status.decode() if isinstance(status, bytes) else status
    return None


def flood_of_empty_calls(source: str, address: str, seconds: float) -> None:
    """Open a connection, start 16 calls that send no message, drop it after 0.2 s; again, for `seconds`.
    (Run it in a process of its own: in the test's own process its Python loop starved the ordinary
    gRPC client, whose calls then ended CANCELLED whatever the server did.)"""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            client = H2Client.open(source, address)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            for _ in range(16):
                client.start_call()
            client.read(0.2)
        finally:
            client.close()


class Loop:
    """`step` over and over in a thread until stopped (or `limit_s`), keeping what it returned."""

    def __init__(self, step: Callable[[], object], limit_s: float = 120) -> None:
        self.step, self.limit_s = step, limit_s
        self.results: list = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self.results.append(self.step())

    def __enter__(self) -> Loop:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(30)


@contextmanager
def all_running(loops: list[Loop]) -> Iterator[list[Loop]]:
    """Start every loop; at the end, stop them all before waiting for any."""
    for loop in loops:
        loop.thread.start()
    try:
        yield loops
    finally:
        for loop in loops:
            loop.stopping.set()
        for loop in loops:
            loop.thread.join(30)
