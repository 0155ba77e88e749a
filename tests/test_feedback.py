"""The loop's first half: what the server answers is captured (off unless asked, never in a request's
way, bounded), reviewed by a person in a folder by predicted class, and submitted as a labeled batch
through add-batch's checks, with its lineage; on disk and in a bucket alike."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmnist.data.incoming import load_batch
from fmnist.ops.review import INDEX, ReviewError, lineage_of, make_review, reviewed_ids, submit_review, unreviewed
from fmnist.serving import capture
from fmnist.serving.capture import Capture, CaptureOptions
from fmnist.serving.metrics import ServingMetrics
from fmnist.storage import Store, join
from tests.helpers import synthetic_images
from tests.serving_helpers import PREDICT, keras_probabilities, running_server, two_version_registry


def captured(store: Store, feedback: str, images: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> None:
    """Records as the server writes them (through Capture's own writer)."""
    keeper = Capture(store, CaptureOptions(feedback, rate=1.0), ServingMetrics("fashion-mnist"))
    probabilities = np.full((len(images), 10), 0.0, np.float32)
    probabilities[np.arange(len(images)), predicted] = confidence
    keeper.offer(images.astype(np.float32) / 255, probabilities, "v0001", "stable")
    keeper.write(keeper.take())


def new_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_images(np.array([5]), seed=34)[0]).save(path)


def test_capture_never_queues_past_its_bound_and_counts_what_it_drops(tmp_path: Path) -> None:
    metrics = ServingMetrics("fashion-mnist")
    keeper = Capture(Store(), CaptureOptions(str(tmp_path / "feedback"), below=0.5), metrics)
    images = np.zeros((1000, 28, 28), np.float32)
    sure, unsure = np.eye(10, dtype=np.float32)[np.zeros(1000, int)], np.full((1000, 10), 0.1, np.float32)
    keeper.offer(images, sure, "v0001", "stable")  # confident: none kept at rate 0
    assert not keeper.queue
    for _ in range(5):
        keeper.offer(images, unsure, "v0001", "stable")
    assert len(keeper.queue) == capture.MAX_QUEUED
    page = metrics.page().decode()
    assert f'fashion_mnist_feedback_dropped_total{{reason="queue_full"}} {5000.0 - capture.MAX_QUEUED}' in page
    keeper.queue.clear()
    keeper.files = capture.MAX_FILES
    keeper.offer(images[:3], unsure[:3], "v0001", "stable")
    assert not keeper.queue and 'reason="files_full"} 3.0' in metrics.page().decode()


def test_review_then_submit_makes_a_labeled_batch_with_its_lineage(root: str, store: Store, tmp_path: Path) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    images = synthetic_images(np.array([0, 1, 7, 9, 3], dtype=np.uint8), seed=31)
    confidence = np.array([0.9, 0.3, 0.6, 0.2, 0.8], np.float32)
    captured(store, feedback, images, np.array([0, 1, 5, 9, 3]), confidence)  # the third is called a sandal
    out = tmp_path / "review"
    assert make_review(store, feedback, out).images == 5
    with open(out / INDEX, newline="") as index:
        rows = list(csv.DictReader(index))
    assert [float(r["confidence"]) for r in rows] == pytest.approx(sorted(confidence.tolist()))  # lowest first
    for row in rows:  # each image is where the index says, as it was served
        png = np.array(Image.open(out / row["file"]))
        assert any((png == image).all() for image in images) and row["file"].split("/")[1] == row["predicted"]
    with pytest.raises(ReviewError, match="is not empty"):
        make_review(store, feedback, out)

    # The reviewer: the sandal is a sneaker; the least sure image is deleted.
    sandal = next(r for r in rows if r["predicted"] == "sandal")
    (out / "images" / "sneaker").mkdir(exist_ok=True)
    shutil.move(out / sandal["file"], out / "images" / "sneaker" / Path(sandal["file"]).name)
    (out / rows[0]["file"]).unlink()
    batch, lineage = submit_review(store, feedback, out, incoming, "feedback-1", None)
    assert (lineage["submitted"], lineage["relabeled"], lineage["deleted"]) == (4, 1, 1)
    assert lineage["served_versions"] == {"v0001": 4} and not out.exists()
    with store.local_tree(batch.path) as folder:
        labels = load_batch(folder)[2]
    assert sorted(labels.tolist()) == sorted([0, 3, 7, 1])  # the relabeled image is a sneaker (7) now
    assert unreviewed(store, feedback) == []  # submitted and deleted records are not offered again
    assert len(reviewed_ids(store, feedback)) == 5
    assert lineage_of(store, feedback, {"canonical": 60000, "feedback-1": 4}) == {
        "reviewed_batches": ["feedback-1"],
        "reviewed_images": 4,
        "served_versions": {"v0001": 4},
    }


def test_a_review_folder_with_stray_files_wrong_sizes_or_copies_is_refused(
    root: str, store: Store, tmp_path: Path
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    captured(store, feedback, synthetic_images(np.array([2, 4]), seed=32), np.array([2, 4]), np.array([0.4, 0.5]))
    out = tmp_path / "review"
    make_review(store, feedback, out)
    with open(out / INDEX, newline="") as index:
        first = next(csv.DictReader(index))["file"]
    cases = [
        (lambda: (out / "images" / "pullover" / "notes.txt").write_text("hi"), "not a .png file"),
        (lambda: Image.fromarray(np.zeros((27, 27), np.uint8)).save(out / "images" / "coat" / "small.png"), "27x27"),
        (lambda: shutil.copy(out / first, out / "images" / "coat" / Path(first).name), "the same record as"),
        (lambda: new_image(out / "images" / "hats" / "hat.png"), "not a class name"),
    ]
    for spoil, message in cases:
        snapshot = tmp_path / "snapshot"
        shutil.copytree(out, snapshot)
        spoil()
        with pytest.raises(ReviewError, match=message):
            submit_review(store, feedback, out, incoming, "feedback-bad", None)
        assert not store.find(incoming) and unreviewed(store, feedback)  # nothing added, nothing marked
        shutil.rmtree(out)
        snapshot.rename(out)


def test_a_server_captures_what_it_answers_only_when_asked(tmp_path: Path) -> None:
    registry = two_version_registry(tmp_path / "registry")
    data_root = tmp_path / "data"
    images = synthetic_images(np.arange(10, dtype=np.uint8), seed=33)
    options = ("--capture-rate", "1", "--data-root", str(data_root))
    with running_server(registry.root, tmp_path / "serve.log", None, *options) as server:
        for start in (0, 4, 7):
            answer = httpx.post(f"{server.url}{PREDICT}", json={"instances": images[start : start + 3].tolist()})
            assert answer.status_code == 200
        metrics = httpx.get(f"{server.url}/monitoring/prometheus/metrics").text
        assert "fashion_mnist_feedback_captured_total 9.0" in metrics
    records = [  # written when the server stopped, if not before
        pq.read_table(io.BytesIO(path.read_bytes())).to_pylist()
        for path in sorted((data_root / "feedback" / "records").glob("*.parquet"))
    ]
    records = [r for file in records for r in file]
    expected = keras_probabilities(registry, "v0001", images)
    sent = {**{i: i for i in range(3)}, **{i: i for i in range(4, 10)}}
    assert (
        len(records) == 9
        and {r["version"] for r in records} == {"v0001"}
        and {r["label"] for r in records} == {"stable"}
    )
    for record in records:
        image = np.frombuffer(record["image"], np.uint8).reshape(28, 28)
        [index] = [i for i in sent if (images[i] == image).all()]
        assert record["predicted"] == expected[index].argmax()
        assert record["confidence"] == pytest.approx(expected[index].max(), abs=1e-5)
    assert len({r["id"] for r in records}) == 9 and len({r["request"] for r in records}) == 3

    with running_server(
        registry.root, tmp_path / "serve-off.log", None, "--data-root", str(tmp_path / "off")
    ) as server:
        assert httpx.post(f"{server.url}{PREDICT}", json={"instances": images.tolist()}).status_code == 200
    assert not (tmp_path / "off" / "feedback").exists()  # capture is off unless asked for
