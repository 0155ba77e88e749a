"""TF Serving's answers as its own protocol buffers (tensorflow-serving-api), for gRPC as they are and
for REST as TF Serving prints them (proto field names, every field), so the two cannot drift apart.
"""

from __future__ import annotations

import re

from google.protobuf.json_format import MessageToDict
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

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


def model_spec(served: Served) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=MODEL_NAME, signature_name=SIGNATURE)
    spec.version.value = served.number
    return spec


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


def status_response(served: list[Served], problem: str | None = None) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for model in served:
        status = response.model_version_status.add(version=model.number)
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        status.status.error_code = 0
    if not served:  # nothing verified loaded yet: what TF Serving reports while a version loads
        status = response.model_version_status.add(version=0)
        status.state = get_model_status_pb2.ModelVersionStatus.LOADING
        status.status.error_code = 14  # UNAVAILABLE
        status.status.error_message = problem or ""
    return response


def signature_def_map() -> get_model_metadata_pb2.SignatureDefMap:
    """The signature of the SavedModel export (`fmnist.training.export`), which this server's inputs mirror."""

    def tensor(name: str, dtype: int, dims: tuple[int, ...]) -> meta_graph_pb2.TensorInfo:
        shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
        return meta_graph_pb2.TensorInfo(name=name, dtype=dtype, tensor_shape=shape)

    signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    signature.inputs[INPUT].CopyFrom(tensor(f"{SIGNATURE}_{INPUT}:0", types_pb2.DT_UINT8, (-1, IMAGE_SIZE, IMAGE_SIZE)))
    signature.outputs[OUTPUT].CopyFrom(tensor("StatefulPartitionedCall:0", types_pb2.DT_FLOAT, (-1, len(CLASS_NAMES))))
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signatures.signature_def[SIGNATURE].CopyFrom(signature)
    return signatures


def metadata_response(served: Served) -> get_model_metadata_pb2.GetModelMetadataResponse:
    response = get_model_metadata_pb2.GetModelMetadataResponse(model_spec=model_spec(served))
    response.metadata["signature_def"].Pack(signature_def_map())
    return response


def as_json(message) -> dict:
    """A message as TF Serving's REST API prints it."""
    return MessageToDict(message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)


def rest_metadata(served: Served) -> dict:
    """TF Serving's REST metadata answer and, under `fashion_mnist`, what the registry knows of the
    version: how it did, on what, from what."""
    manifest = served.manifest
    return {
        "model_spec": as_json(model_spec(served)),
        "metadata": {"signature_def": as_json(signature_def_map())},
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
