"""How the server runs (`fashion-mnist serve`'s options), in a module light enough for the CLI to read
its defaults from."""

from __future__ import annotations

from dataclasses import dataclass

MAX_CONNECTIONS = 256  # requests and connections at once; more get a 503
HEADER_S = 5.0  # from a connection's first byte (or its opening) to its request's complete head
BODY_S = 30.0  # from the head to the body's last byte: 16 MiB at 4.5 Mbit/s
IDLE_S = 60.0  # a gRPC connection with no call open is closed after this
CONNECTION_AGE_S = 600.0  # a gRPC connection is asked to go away after this (its calls get BODY_S to finish)
MAX_BODY_BYTES_IN_FLIGHT = 256 << 20  # all requests' bodies held at once
CAPTURE_FLUSH_S = 60.0  # a partial file of captured records is written once its oldest has waited this long


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8501  # TF Serving's REST port
    grpc_port: int | None = 8500  # TF Serving's gRPC port; None: no gRPC
    poll_s: float = 2.0  # how often the champion pointer and the labels are read
    max_connections: int = MAX_CONNECTIONS
    header_timeout_s: float = HEADER_S
    body_timeout_s: float = BODY_S
    idle_s: float = IDLE_S
    connection_age_s: float = CONNECTION_AGE_S
    max_body_mib_in_flight: int = MAX_BODY_BYTES_IN_FLIGHT >> 20
    parse_workers: int = 2  # processes that parse big bodies; 0: on the event loop
    canary_share: float = 0.0  # of requests that name no version or label, answered by the canary
    shadow_share: float = 0.0  # of stable's requests, also sent to the canary to compare
    feedback_root: str | None = None  # <data_root>/feedback: where captured records go
    capture_rate: float = 0.0  # share of answered images kept for review
    capture_below: float = 0.0  # images whose top probability is under this are always kept
    capture_flush_s: float = CAPTURE_FLUSH_S  # how long a captured record waits for a file's worth
    access_log: bool = False

    @property
    def max_body_bytes_in_flight(self) -> int:
        return self.max_body_mib_in_flight << 20
