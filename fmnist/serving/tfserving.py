"""TF Serving's API as its REST clients see it, without TensorFlow: its paths, how it reads the version
or label a request names, and its answers as its REST API prints them (proto field names, every field).
gRPC's answers are TF Serving's own protocol buffers parsed from these same dicts (`grpc_api`), so the
two cannot drift apart.
"""

from __future__ import annotations

import re

from fmnist.data.dataset import CLASS_NAMES, IMAGE_SIZE
from fmnist.serving.errors import BadRequest, NotFound
from fmnist.serving.models import MODEL_NAME, Served
from fmnist.training.export import INPUT, OUTPUT, SIGNATURE

# TF Serving's REST paths (http_rest_api_util.cc), matched case-insensitively as it does; `classify-png`
# is this server's own verb.
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify-png|classify|regress|predict)", re.I
)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?", re.I)
MAX_VERSION = (1 << 63) - 1  # an int64, as the ModelSpec's


def model_spec(served: Served) -> dict:
    """A ModelSpec (int64s print as strings)."""
    return {"name": MODEL_NAME, "version": str(served.number), "signature_name": SIGNATURE}


def requested(name: str, version: str | None, label: str | None) -> tuple[int | None, str | None]:
    """The version number or label a request names, checked as TF Serving checks them."""
    if name != MODEL_NAME:  # (the path comes percent-decoded)
        asked = f"Specific({name[:64]}, {version})" if version else f"Latest({name[:64]})"
        raise NotFound(f"Servable not found for request: {asked}")
    if version is not None:
        # Longer than any int64, it is refused before int() reads it (past 4,300 digits int() raises).
        if len(version) > len(str(MAX_VERSION)) or int(version) > MAX_VERSION:
            raise BadRequest(f"Failed to convert version: {version[:32]} to numeric.")
        return int(version), None
    return None, label


def status_response(served: list[Served], problem: str | None = None) -> dict:
    """A GetModelStatusResponse: each version served, AVAILABLE."""
    if not served:  # nothing verified loaded yet: what TF Serving reports while a version loads
        # (a version of 0 is an unset field: the proto's JSON prints it last)
        status = {"error_code": "UNAVAILABLE", "error_message": problem or ""}
        return {"model_version_status": [{"state": "LOADING", "status": status, "version": "0"}]}
    available = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    return {"model_version_status": [{"version": str(model.number), **available} for model in served]}


def signature_def_map() -> dict:
    """A SignatureDefMap: the signature of the SavedModel export (`fmnist.training.export`), which this
    server's inputs mirror."""

    def tensor(name: str, dtype: str, dims: tuple[int, ...]) -> dict:
        shape = {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}
        return {"name": name, "dtype": dtype, "tensor_shape": shape}

    signature = {
        "inputs": {INPUT: tensor(f"{SIGNATURE}_{INPUT}:0", "DT_UINT8", (-1, IMAGE_SIZE, IMAGE_SIZE))},
        "outputs": {OUTPUT: tensor("StatefulPartitionedCall:0", "DT_FLOAT", (-1, len(CLASS_NAMES)))},
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    return {"signature_def": {SIGNATURE: signature}}


def rest_metadata(served: Served) -> dict:
    """TF Serving's REST metadata answer and, under `fashion_mnist`, what the registry knows of the
    version: how it did, on what, from what."""
    manifest = served.manifest
    return {
        "model_spec": model_spec(served),
        "metadata": {"signature_def": signature_def_map()},
        "fashion_mnist": {
            "version": served.version,
            "classes": list(CLASS_NAMES),
            "registered_at": manifest.registered_at,
            "metrics": manifest.metrics.model_dump(),
            "preset": manifest.params.preset,
            "gate": manifest.gate.reason,
            "model_sha256": served.model_sha256,
        },
    }
