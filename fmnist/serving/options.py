"""How the server runs: `fashion-mnist serve`'s options, defined once. The CLI makes its flags and their help
from this model (`fmnist.ops.flags`), so a new option is one field here; this module stays light enough for
the CLI to import."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fmnist.evaluation.evidence import MAX_WINDOW_S

MAX_CONNECTIONS = 256  # requests and connections at once; more get a 503
HEADER_S = 5.0  # from a connection's first byte (or its opening) to its request's complete head
BODY_S = 30.0  # from the head to the body's last byte: 16 MiB at 4.5 Mbit/s
IDLE_S = 60.0  # a gRPC connection with no call open is closed after this
CONNECTION_AGE_S = 600.0  # a gRPC connection is asked to go away after this (its calls get BODY_S to finish)
MAX_BODY_BYTES_IN_FLIGHT = 256 << 20  # all requests' bodies held at once
CAPTURE_FLUSH_S = 60.0  # a partial file of captured records is written once its oldest has waited this long
EVIDENCE_WINDOW_S = 60  # seconds of live evidence per window file (fmnist.serving.evidence)

# Field markers the flag generator reads (json_schema_extra): a field set another way than by its own flag,
# and an optional port that a `--no-...` flag turns off.
NOT_A_FLAG = {"flag": False}
NO_GRPC = {"off_flag": "--no-grpc", "off_help": "serve REST only"}


class ServeOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="address to bind (default: loopback only)")
    port: int = Field(8501, ge=0, le=65535, description="REST; TF Serving's port")
    grpc_port: int | None = Field(
        8500, ge=0, le=65535, description="gRPC; TF Serving's port", json_schema_extra=NO_GRPC
    )
    poll_s: float = Field(2.0, ge=0.05, le=3600, description="how often the champion pointer and the labels are read")
    max_connections: int = Field(
        MAX_CONNECTIONS, ge=1, le=65536, description="connections at once; beyond it a 503 (bounds memory)"
    )
    header_timeout_s: float = Field(
        HEADER_S,
        ge=0.1,
        le=600,
        description="for a request's head, from its first byte; then a 408 and the connection closed",
    )
    body_timeout_s: float = Field(
        BODY_S, ge=0.1, le=3600, description="for a request's body, from its head; then a 408 and the connection closed"
    )
    # Not flags: the gRPC connections' lifetimes, fixed (docs/serving.md).
    idle_s: float = Field(IDLE_S, gt=0, le=3600, json_schema_extra=NOT_A_FLAG)
    connection_age_s: float = Field(CONNECTION_AGE_S, gt=0, le=86400, json_schema_extra=NOT_A_FLAG)
    max_body_mib_in_flight: int = Field(
        MAX_BODY_BYTES_IN_FLIGHT >> 20,
        ge=1,
        le=1 << 16,
        description="MiB of request bodies held at once, across requests; beyond it a 429",
    )
    parse_workers: int = Field(
        2, ge=0, le=64, description="processes that parse big bodies off the event loop (0: on it)"
    )
    canary_share: float = Field(
        0.0, ge=0, le=1, description="share of the requests naming no version or label that the canary answers"
    )
    shadow_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of stable's requests also sent to the canary, to count how often the two agree",
    )
    capture_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of answered images kept for review in <data root>/feedback (default: none)",
    )
    capture_below: float = Field(
        0.0, ge=0, le=1, description="images whose top probability is under this are always kept (default: none)"
    )
    capture_flush_s: float = Field(
        CAPTURE_FLUSH_S,
        ge=1,
        le=3600,
        description="longest a captured image waits for a file's worth before a smaller file is written "
        f"(default: {CAPTURE_FLUSH_S:g} s)",
    )
    evidence_window_s: int = Field(
        EVIDENCE_WINDOW_S,
        ge=0,
        le=MAX_WINDOW_S,
        description="seconds of live evidence (counts per version) per file written under <registry>/evidence "
        f"for the rollout judge and the monitor; 0: none (default: {EVIDENCE_WINDOW_S} s)",
    )
    access_log: bool = Field(False, description="log every request")
    # <data root>/feedback, where captured records go: from --data-root, as every command's data root.
    feedback_root: str | None = Field(None, json_schema_extra=NOT_A_FLAG)

    @property
    def max_body_bytes_in_flight(self) -> int:
        return self.max_body_mib_in_flight << 20
