"""Live evidence: what a server counts of each version it serves, written as windows beside the registry
(fmnist.serving.evidence), and read back, added up and pruned (fmnist.evaluation.evidence).

In this process, on stub models (no TensorFlow), on disk and in a bucket: requests add up to the windows
written, shadowed requests pair both models' answers, replicas and restarts add up without double counting,
a failing store holds at most its bound and counts what it drops, and damaged files are skipped and named.
One real process: traffic, SIGTERM, and windows that add up to exactly what was sent."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from fmnist.data.dataset import NUM_CLASSES
from fmnist.evaluation import evidence
from fmnist.evaluation.evidence import (
    MAX_WINDOW_BYTES,
    MODEL_FAILED,
    EvidenceWindow,
    evidence_root,
    prune_evidence,
    read_windows,
    sum_windows,
    window_location,
)
from fmnist.registry.labels import Labels
from fmnist.registry.versions import Registry
from fmnist.serving.errors import ModelFailed
from fmnist.serving.evidence import MAX_HELD_WINDOWS, Attempt, EvidenceRecorder, EvidenceWriter
from fmnist.serving.metrics import ServingMetrics
from fmnist.serving.models import ModelCall
from fmnist.storage import Store, join
from tests.helpers import synthetic_images
from tests.serving_helpers import (
    PREDICT,
    app_client,
    load_stub_model,
    metric_samples,
    parsed_samples,
    running_server,
    stub_probabilities,
    wait_for_versions,
    write_stub_registry,
)

INFER = "/v2/models/fashion-mnist/infer"


def images_of(count: int, seed: int) -> np.ndarray:
    return synthetic_images(np.arange(count, dtype=np.uint8) % NUM_CLASSES, seed=seed)


def stub_registry_in(root: str, store: Store, tmp_path: Path) -> Registry:
    """Two stub versions (v0001 the champion) in a registry at `root`, on either backend."""
    return write_stub_registry(tmp_path / "models", Registry(store, root))


def replica_of(client: TestClient) -> str:
    return client.app.state.serving.core.evidence.replica


def class_counts(registry: Registry, version: str, sent: list[np.ndarray]) -> list[int]:
    classes = np.concatenate([stub_probabilities(registry, version, images).argmax(axis=1) for images in sent])
    return np.bincount(classes, minlength=NUM_CLASSES).tolist()


def test_requests_add_up_to_the_windows_written_on_every_backend(root: str, store: Store, tmp_path: Path) -> None:
    registry = stub_registry_in(root, store, tmp_path)
    since, sent = time.time(), []
    with app_client(registry, evidence_window_s=1) as client:
        for index in range(12):
            images = images_of(1 + index % 4, seed=index)
            path = (
                PREDICT,
                "/v1/models/fashion-mnist/labels/stable:predict",
                "/v1/models/fashion-mnist/versions/1:predict",
            )
            answer = client.post(path[index % 3], json={"instances": images.tolist()})
            assert answer.status_code == 200 and answer.headers["x-model-version"] == "v0001"
            sent.append(images)
            if index == 5:
                time.sleep(1.3)  # a window written while it serves
        images = images_of(3, seed=99)
        tensor = {"name": "images", "shape": list(images.shape), "datatype": "UINT8", "data": images.ravel().tolist()}
        assert client.post(INFER, json={"inputs": [tensor]}).status_code == 200  # KServe's door counts too
        sent.append(images)
        # Refused after its version was chosen (REST chooses before the body): counted under v0001.
        for _ in range(2):
            assert (
                client.post(PREDICT, content=b"{not json", headers={"content-type": "application/json"}).status_code
                == 400
            )
        # Refused before any version was chosen: Prometheus counts it, no version's evidence does.
        unknown = client.post("/v1/models/fashion-mnist/labels/nope:predict", json={"instances": sent[0].tolist()})
        assert unknown.status_code == 400
        samples = metric_samples(client)
        replica = replica_of(client)
    read = read_windows(store, root, "v0001", since)
    totals = sum_windows(read.windows)
    assert read.skipped == [] and read.left_out == 0 and len(read.windows) >= 2
    assert totals.replicas == {replica} and {w.label for w in read.windows} == {"stable"}
    assert totals.requests == 13 + 2 and totals.errors == {"bad_request": 2}
    assert totals.images == sum(len(images) for images in sent) == sum(totals.confidence)
    assert totals.predicted == class_counts(registry, "v0001", sent)
    assert sum(totals.latency_ms) == 13  # the requests that reached the model: refused ones would dilute its p99
    # The same seam: every request the metrics count as answered or refused (the unknown label aside).
    counted = sum(v for (name, labels), v in samples.items() if name == ":tensorflow:serving:request_count_total")
    assert counted == totals.requests + 1
    assert read_windows(store, root, "v0002", since).windows == []  # kept back: never served


def test_shadowed_requests_pair_both_models_answers(root: str, store: Store, tmp_path: Path) -> None:
    registry = stub_registry_in(root, store, tmp_path)
    Labels(registry).set("canary", "v0002", "shadowed")
    since, sent = time.time(), []
    with app_client(registry, shadow_share=1, evidence_window_s=1) as client:
        wait_for_versions(client, ["1", "2"])
        for index in range(8):
            sent.append(images_of(2 + index % 3, seed=40 + index))
            assert client.post(PREDICT, json={"instances": sent[-1].tolist()}).status_code == 200
        images = sum(len(images) for images in sent)
        deadline = time.monotonic() + 10  # the shadow calls run after stable's answers
        while (
            sum(v for (n, _), v in metric_samples(client).items() if n == "fashion_mnist_shadow_comparisons_total")
            < images
        ):
            assert time.monotonic() < deadline, "the shadow calls did not finish"
            time.sleep(0.1)
    shadow = read_windows(store, root, "v0002", since)
    assert {(w.label, w.source, w.paired_with) for w in shadow.windows} == {("canary", "shadow", "v0001")}
    totals = sum_windows(shadow.windows)
    stable = np.concatenate([stub_probabilities(registry, "v0001", i).argmax(axis=1) for i in sent])
    canary = np.concatenate([stub_probabilities(registry, "v0002", i).argmax(axis=1) for i in sent])
    expected = np.bincount(stable * NUM_CLASSES + canary, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    assert totals.pairs == {"v0001": expected.tolist()}
    assert (totals.requests, totals.images, totals.errors) == (8, images, {})
    assert totals.predicted == class_counts(registry, "v0002", sent)
    served = sum_windows(read_windows(store, root, "v0001", since).windows)
    assert (served.requests, served.images, served.pairs) == (8, images, {})


def window_counts(recorder: EvidenceRecorder, version: str, requests: int, images: int) -> None:
    """`requests` answered requests of `images` images each, as the server feeds the recorder."""
    for _ in range(requests):
        recorder.answered(Attempt(version, "stable"), None, 0.003)
        recorder.served(version, "stable", np.full((images, NUM_CLASSES), 1 / NUM_CLASSES, np.float32))


def test_replicas_and_a_restart_add_up_without_double_counting(root: str, store: Store) -> None:
    metrics = ServingMetrics("fashion-mnist")
    first, second = EvidenceRecorder(metrics), EvidenceRecorder(metrics)  # two replicas, started together
    writers = [EvidenceWriter(r, store, root, 1, metrics) for r in (first, second)]
    window_counts(first, "v0001", 3, 2)
    window_counts(second, "v0001", 5, 1)
    for writer in writers:
        writer.hold(writer.recorder.swap())
        writer.write_held()
    restarted = EvidenceRecorder(metrics)  # the first replica's process, started again: a new id
    window_counts(restarted, "v0001", 4, 3)
    restart_writer = EvidenceWriter(restarted, store, root, 1, metrics)
    windows = restarted.swap()
    restart_writer.hold(windows)
    restart_writer.write_held()
    restart_writer.hold(windows)  # written again (a lost acknowledgement's retry): the same file, no second
    restart_writer.write_held()
    read = read_windows(store, root, "v0001", 0)
    totals = sum_windows(read.windows)
    assert (totals.requests, totals.images, totals.windows) == (3 + 5 + 4, 6 + 5 + 12, 3)
    assert totals.replicas == {first.replica, second.replica, restarted.replica} and len(totals.replicas) == 3
    assert len(store.listdir(join(evidence_root(root), "v0001"))) == 3


def test_a_failing_store_holds_at_most_the_bound_and_counts_what_it_drops(tmp_path: Path) -> None:
    blocked = tmp_path / "registry"
    blocked.write_text("a file where the registry's folder should be: every write fails")
    store, metrics, ticks = Store(), ServingMetrics("fashion-mnist"), iter(range(1_000, 2_000))
    recorder = EvidenceRecorder(metrics, clock=lambda: float(next(ticks)))
    writer = EvidenceWriter(recorder, store, str(blocked), 1, metrics)
    for _ in range(MAX_HELD_WINDOWS + 3):
        window_counts(recorder, "v0001", 1, 1)
        writer.hold(recorder.swap())
        writer.write_held()
    assert len(writer.held) == MAX_HELD_WINDOWS
    dropped = ("fashion_mnist_evidence_dropped_total", (("reason", "write_failed"),))
    assert metric_samples_of(metrics)[dropped] == 3
    blocked.unlink()  # the store is back: the held windows are written at the next tick
    writer.hold(recorder.swap())  # (nothing counted since)
    writer.write_held()
    assert not writer.held
    read = read_windows(store, str(blocked), "v0001", 0)
    assert [w.start for w in read.windows] == [float(t) for t in range(1_003, 1_003 + MAX_HELD_WINDOWS)]
    assert sum_windows(read.windows).requests == MAX_HELD_WINDOWS


def test_at_the_stop_a_failing_store_drops_the_partial_window_and_counts_it(tmp_path: Path) -> None:
    blocked = tmp_path / "registry"
    blocked.write_text("not a folder")
    metrics = ServingMetrics("fashion-mnist")
    recorder = EvidenceRecorder(metrics)
    writer = EvidenceWriter(recorder, Store(), str(blocked), 60, metrics)
    window_counts(recorder, "v0001", 2, 1)
    asyncio.run(writer.drain())
    assert metric_samples_of(metrics)[("fashion_mnist_evidence_dropped_total", (("reason", "stopped"),))] == 1


FAILING_BATCH = 7  # images in a model call that the failing model below refuses


def failing_on_seven(registry: Registry, record: dict) -> tuple[ModelCall, str]:
    """The stub model, failing every call of FAILING_BATCH images (as a model that runs out of memory)."""
    call, sha256 = load_stub_model(registry, record)

    def predict(images: np.ndarray) -> np.ndarray:
        if len(images) == FAILING_BATCH:
            raise RuntimeError("out of memory")
        return call(images)

    return predict, sha256


def test_a_model_call_that_fails_is_an_error_of_its_version(store: Store, tmp_path: Path) -> None:
    registry = stub_registry_in(str(tmp_path / "registry"), store, tmp_path)
    since = time.time()
    with app_client(registry, load=failing_on_seven, evidence_window_s=60) as client:
        failed = client.post(PREDICT, json={"instances": images_of(FAILING_BATCH, seed=1).tolist()})
        assert failed.status_code == 500 and "v0001 failed to answer: out of memory" in failed.json()["error"]
        assert client.post(PREDICT, json={"instances": images_of(2, seed=2).tolist()}).status_code == 200
    totals = sum_windows(read_windows(store, registry.root, "v0001", since).windows)  # the window written at the stop
    assert (totals.requests, totals.images, totals.errors, totals.model_failures) == (2, 2, {MODEL_FAILED: 1}, 1)


def test_a_failed_shadow_call_counts_against_the_canary() -> None:
    recorder = EvidenceRecorder()
    stable = np.eye(NUM_CLASSES, dtype=np.float32)[[1, 2]]
    recorder.shadowed("v0002", "v0001", stable, None, 0.01)
    (window,) = recorder.swap()
    assert (window.source, window.paired_with, window.errors) == ("shadow", "v0001", {ModelFailed.reason: 1})
    assert window.pairs == [[0] * NUM_CLASSES] * NUM_CLASSES and window.images == 0


def test_damaged_window_files_are_skipped_and_named(root: str, store: Store) -> None:
    recorder = EvidenceRecorder(clock=lambda: 1_700_000_000.0)
    window_counts(recorder, "v0001", 2, 1)
    (window,) = recorder.swap()
    store.create(window_location(root, window), window.model_dump_json().encode())
    folder = join(evidence_root(root), "v0001")
    valid = window.model_dump_json().encode()

    def named(start: float) -> str:
        return join(folder, window.model_copy(update={"start": start}).file_name())

    damaged = {
        named(1_700_000_001.0): b"{not json",
        named(1_700_000_002.0): json.dumps({**json.loads(valid), "requests": -1}).encode(),
        named(1_700_000_003.0): valid,  # its name says another start than its content
        named(1_700_000_004.0): b" " * (MAX_WINDOW_BYTES + 1) + valid,
        named(1_700_000_005.0): json.dumps({**json.loads(valid), "images": 5}).encode(),  # counts do not add up
        join(folder, "notes.txt"): b"not a window",
    }
    other_version = window.model_copy(update={"version": "v0002", "start": 1_700_000_006.0})
    damaged[named(1_700_000_006.0)] = other_version.model_dump_json().encode()  # v0002's, in v0001's folder
    for location, data in damaged.items():
        store.create(location, data)
    read = read_windows(store, root, "v0001", 0)
    assert read.windows == [window]
    assert sorted(line.split(": ", 1)[0] for line in read.skipped) == sorted(damaged)
    assert any("not a window's name" in line for line in read.skipped)
    assert any(f"over {MAX_WINDOW_BYTES:,} bytes" in line for line in read.skipped)
    assert any("not what its name says" in line for line in read.skipped)
    in_range = read_windows(store, root, "v0001", 1_700_000_002.0, 1_700_000_004.0)
    assert len(in_range.skipped) == 3 and in_range.windows == []  # the two in range, and the bad name
    with pytest.raises(ValueError, match="not a registry version"):
        read_windows(store, root, "../v0001", 0)
    # Pruning: the files named as windows older than the cutoff go; what is no window stays, named.
    assert prune_evidence(store, root, older_than_s=3.5, now=1_700_000_006.0).deleted == 3
    assert len(store.listdir(folder)) == len(damaged) + 1 - 3
    pruned = prune_evidence(store, root, older_than_s=1, now=time.time() + 10)
    assert pruned.deleted == len(damaged) - 3 and pruned.left == [f"{join(folder, 'notes.txt')}: not a window's name"]
    assert store.listdir(folder) == ["notes.txt"]


def test_a_read_is_bounded_to_the_newest_windows_and_names_a_bounded_number_of_bad_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evidence, "MAX_WINDOWS", 3)
    monkeypatch.setattr(evidence, "MAX_SKIPPED_NAMED", 2)
    store, root, ticks = Store(), str(tmp_path / "registry"), iter(range(1_000, 2_000))
    recorder = EvidenceRecorder(clock=lambda: float(next(ticks)))
    for _ in range(5):
        window_counts(recorder, "v0001", 1, 1)
        (window,) = recorder.swap()
        store.create(window_location(root, window), window.model_dump_json().encode())
    for index in range(4):
        store.create(join(evidence_root(root), "v0001", f"junk-{index}"), b"{}")
    read = read_windows(store, root, "v0001", 0)
    assert [w.start for w in read.windows] == [1_002.0, 1_003.0, 1_004.0] and read.left_out == 2
    assert len(read.skipped) == 3 and read.skipped[-1].endswith("2 more files that are no windows")


def metric_samples_of(metrics: ServingMetrics) -> dict[tuple[str, tuple], float]:
    return parsed_samples(metrics.page().decode())


@pytest.mark.training
def test_a_server_stopped_by_sigterm_has_written_exactly_what_it_answered(tmp_path: Path) -> None:
    """REST and gRPC requests (one seam counts both), then SIGTERM: the partial window is written as it stops."""
    import grpc
    import httpx
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tests.serving_helpers import two_version_registry

    def grpc_predict(stub, images: np.ndarray) -> None:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "fashion-mnist"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
        assert stub.Predict(request, timeout=10).model_spec.version.value == 1

    registry = two_version_registry(tmp_path)
    since, sent = time.time(), 0
    with (
        running_server(registry.root, tmp_path / "serve.log", None, "--evidence-window-s", "1") as running,
        grpc.insecure_channel(running.grpc) as channel,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for index in range(40):
            images = images_of(1 + index % 5, seed=index)
            if index % 4:
                answer = httpx.post(f"{running.url}{PREDICT}", json={"instances": images.tolist()})
                assert answer.status_code == 200
            else:
                grpc_predict(stub, images)
            sent += len(images)
            time.sleep(0.05)  # over two seconds: windows written while it serves, and a partial one at the stop
    read = read_windows(registry.store, registry.root, "v0001", since)
    totals = sum_windows(read.windows)
    assert read.skipped == [] and len(read.windows) >= 2 and len(totals.replicas) == 1
    assert (totals.requests, totals.images, totals.errors) == (40, sent, {})


def a_shadow_window(**changes) -> dict:
    """A consistent shadow window of 3 images (2 agreeing), as a dict to damage."""
    window = EvidenceWindow(
        replica="ab" * 16,
        version="v0002",
        label="canary",
        source="shadow",
        start=10.0,
        end=70.0,
        requests=3,
        images=3,
        latency_ms=[3] + [0] * 13,
        predicted=[2, 1] + [0] * 8,
        confidence=[0] * 99 + [3],
        probabilities=[[0] * 19 + [3]] * 10,
        paired_with="v0001",
        pairs=[[2, 0] + [0] * 8, [1, 0] + [0] * 8] + [[0] * 10] * 8,
    ).model_dump()
    return window | changes


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"pairs": [[10**6] * 10] * 10}, "pairs are a shadow window's"),  # agreement forged beyond its images
        ({"pairs": [[2**62] * 10] * 10}, "a count over"),  # sums that wrap numpy's int64 to nothing
        ({"images": 2**64, "requests": 2**64}, "a count over"),
        ({"source": "served"}, "pairs are a shadow window's"),
        ({"probabilities": [[0] * 19 + [4]] * 10}, "probability histogram does not add up"),
        ({"latency_ms": [9] + [0] * 13}, "latency histogram"),
        ({"errors": {"bad_request": 5}}, "latency histogram"),  # more refused than requested
        ({"errors": {"model_failed": 100}}, "more failed model calls than model calls"),
        ({"end": 10.0 + 86_400}, "a server writes at most"),  # a day claimed as one window
        (  # a billion consistent images in a minute: what no replica answers, outweighing every real window
            {
                "requests": 10**9,
                "images": 10**9,
                "latency_ms": [10**9] + [0] * 13,
                "predicted": [10**9] + [0] * 9,
                "confidence": [0] * 99 + [10**9],
                "probabilities": [[0] * 19 + [10**9]] * 10,
                "pairs": [[10**9] + [0] * 9] + [[0] * 10] * 9,
            },
            "images a second",
        ),
    ],
)
def test_a_window_whose_counts_do_not_hold_together_is_no_evidence(change: dict, problem: str) -> None:
    EvidenceWindow.model_validate(a_shadow_window())
    with pytest.raises(ValueError, match=problem):
        EvidenceWindow.model_validate(a_shadow_window(**change))
