"""TF Serving's gRPC definitions without TensorFlow.

tensorflow-serving-api's generated modules import `tensorflow.core.framework`, so importing any of them
runs TensorFlow's `__init__` (3.7 CPU-s and hundreds of MB): a server process, or a body parser, that only
parses and writes these messages paid for all of TensorFlow. `tensorflow_serving.binpb` holds the
definitions the server speaks (a FileDescriptorSet: PredictionService's and ModelService's files, with
every file they import), taken from the installed tensorflow-serving-api, whose version
`tensorflow_serving.json` records. `load` puts them into protobuf's default pool, where TensorFlow's own
modules, imported later to load a model, find the same files and add nothing; server reflection finds the
services there. Where the installed version differs, or the file is unreadable, the definitions come
from tensorflow-serving-api itself (importing TensorFlow), with a warning: a stale file in the pool would
stop TensorFlow's import. After an upgrade, write both files again (imports TensorFlow):

    .venv/bin/python -m fmnist.serving.protos.tensorflow_serving
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESCRIPTOR_SET = Path(__file__).with_name("tensorflow_serving.binpb")
WRITTEN_FROM = DESCRIPTOR_SET.with_suffix(".json")  # {package: version} of what the set was taken from
PACKAGES = ("tensorflow-serving-api", "tensorflow")
SERVICES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
WRITE_AGAIN = f"python -m {__name__} writes it again"

log = logging.getLogger(__name__)


def installed_versions() -> dict[str, str]:
    return {package: importlib.metadata.version(package) for package in PACKAGES}


@cache
def load() -> None:
    """TF Serving's definitions into the default pool (once a process): the set's files, each after the
    files it imports, where the installed packages are the set's; else tensorflow-serving-api's modules."""
    # The installed protobuf's own well-known types first: a copy from the set never stands in for them.
    from google.protobuf import any_pb2, wrappers_pb2  # noqa: F401

    try:
        files = _written_files()
    except ValueError as exc:
        log.warning("%s; TF Serving's definitions come from tensorflow-serving-api instead (imports TensorFlow)", exc)
        from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401

        return
    pool = descriptor_pool.Default()
    for file in files:
        try:
            pool.FindFileByName(file.name)
        except KeyError:
            pool.AddSerializedFile(file.SerializeToString())


def _written_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The set's files, if they are the installed packages'; ValueError naming the file and the problem."""
    try:
        written_from = json.loads(WRITTEN_FROM.read_text())
        files = list(descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file)
    except Exception as exc:  # missing, unreadable, or not what it should be (protobuf's DecodeError)
        raise ValueError(f"{DESCRIPTOR_SET} or {WRITTEN_FROM}: unreadable ({exc}); {WRITE_AGAIN}") from None
    try:
        installed = installed_versions()
    except importlib.metadata.PackageNotFoundError as exc:
        raise ValueError(f"{exc.name} is not installed") from None
    if written_from != installed:
        raise ValueError(f"{DESCRIPTOR_SET} was written from {written_from}, {installed} is installed; {WRITE_AGAIN}")
    return files


@cache
def message_class(full_name: str) -> type:
    """The class of a message TF Serving's files define ("tensorflow.serving.PredictResponse"); looked up once
    (each request's parse and answer asks)."""
    load()
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(full_name))


def installed_descriptor_set() -> bytes:
    """The set as the installed tensorflow-serving-api defines it: the files of `SERVICES`, each after the
    files it imports. Imports TensorFlow."""
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401

    pool = descriptor_pool.Default()
    ordered: list = []

    def visit(file) -> None:
        if file not in ordered:
            for dependency in file.dependencies:
                visit(dependency)
            ordered.append(file)

    for name in SERVICES:
        visit(pool.FindFileContainingSymbol(name))
    files = [descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb) for file in ordered]
    return descriptor_pb2.FileDescriptorSet(file=files).SerializeToString(deterministic=True)


if __name__ == "__main__":
    DESCRIPTOR_SET.write_bytes(installed_descriptor_set())
    WRITTEN_FROM.write_text(json.dumps(installed_versions(), indent=1) + "\n")
    print(f"wrote {DESCRIPTOR_SET} and {WRITTEN_FROM}")
