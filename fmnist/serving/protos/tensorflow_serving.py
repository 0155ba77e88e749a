"""TF Serving's gRPC message types without TensorFlow.

tensorflow-serving-api's generated modules import `tensorflow.core.framework`, so importing any of them
runs TensorFlow's `__init__` (3.7 CPU-s and hundreds of MB): a server process, or a body parser, that only
parses and writes these messages paid for all of TensorFlow. `tensorflow_serving.binpb` holds the
definitions the server speaks (a FileDescriptorSet: the request and response messages of Predict,
GetModelMetadata and GetModelStatus, with every file they import), taken from the installed
tensorflow-serving-api; `load` puts them into protobuf's default pool, where TensorFlow's own modules,
imported later to load a model, find the same files and add nothing. A test compares the file with the
installed package; after an upgrade, write it again (imports TensorFlow):

    .venv/bin/python -m fmnist.serving.protos.tensorflow_serving
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = Path(__file__).with_name("tensorflow_serving.binpb")
# The messages the server parses and answers with; the set holds their files and what those import.
MESSAGES = (
    "tensorflow.serving.PredictRequest",
    "tensorflow.serving.PredictResponse",
    "tensorflow.serving.GetModelMetadataRequest",
    "tensorflow.serving.GetModelMetadataResponse",
    "tensorflow.serving.GetModelStatusRequest",
    "tensorflow.serving.GetModelStatusResponse",
)


@cache
def load() -> None:
    """The set's files into the default pool, each after the files it imports; a file already there
    (TensorFlow imported first) is left as it is."""
    pool = descriptor_pool.Default()
    for file in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file:
        try:
            pool.FindFileByName(file.name)
        except KeyError:
            pool.AddSerializedFile(file.SerializeToString())


def message_class(full_name: str) -> type:
    """The class of a message the set defines ("tensorflow.serving.PredictResponse", "tensorflow.TensorProto")."""
    load()
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))


def installed_descriptor_set() -> bytes:
    """The set as the installed tensorflow-serving-api defines it: the files of `MESSAGES`, each after the
    files it imports. Imports TensorFlow."""
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    ordered: list = []

    def visit(file) -> None:
        if file not in ordered:
            for dependency in file.dependencies:
                visit(dependency)
            ordered.append(file)

    for name in MESSAGES:
        visit(pool.FindMessageTypeByName(name).file)
    files = [descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb) for file in ordered]
    return descriptor_pb2.FileDescriptorSet(file=files).SerializeToString(deterministic=True)


if __name__ == "__main__":
    DESCRIPTOR_SET.write_bytes(installed_descriptor_set())
    print(f"wrote {DESCRIPTOR_SET}")
