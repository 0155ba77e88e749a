"""The loop's first half: what the server answers is captured (off unless asked, never in a request's
way, bounded), reviewed by a person in a folder by predicted class, and submitted as a labeled batch
through add-batch's checks, with its lineage; on disk and in a bucket alike."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fmnist.data.feedback import feedback_lineage, ledger_location
from fmnist.data.incoming import load_batch
from fmnist.ops.review import (
    INDEX,
    ReviewError,
    compact_records,
    make_review,
    reviewed_by,
    submit_review,
)
from fmnist.registry.manifest import FeedbackRecord, model_card
from fmnist.serving import capture
from fmnist.serving.capture import Capture, CaptureOptions
from fmnist.serving.metrics import ServingMetrics
from fmnist.storage import Store, join
from tests.feedback_helpers import captured, new_image, waiting
from tests.helpers import synthetic_images, version_manifest
from tests.serving_helpers import PREDICT, running_server, stub_probabilities, write_stub_registry


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
    keeper.records = capture.MAX_RECORDS
    keeper.offer(images[:3], unsure[:3], "v0001", "stable")
    assert not keeper.queue and 'reason="folder_full"} 3.0' in metrics.page().decode()


def test_a_trickle_of_captures_writes_a_file_a_flush_and_a_full_folder_pauses_capture_until_reviewed(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted in files, one record every few seconds once filled the folder in hours and stopped capture."""
    feedback = join(root, "feedback")
    metrics = ServingMetrics("fashion-mnist")
    unsure = np.full((1, 10), 0.1, np.float32)

    def offer(keeper: Capture, count: int) -> None:
        for i in range(count):
            image = synthetic_images(np.array([i % 10]), seed=40 + i).astype(np.float32) / 255
            keeper.offer(image, unsure, "v0001", "stable")

    async def trickle(keeper: Capture, count: int, then=None) -> float:
        started = time.monotonic()
        writer = asyncio.create_task(keeper.run())
        for _ in range(count):
            offer(keeper, 1)
            await asyncio.sleep(0.05)
        if then:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(then)  # a review, while the server runs
            await asyncio.sleep(0.5)  # a flush cycle or two: it looks at the folder again
            offer(keeper, 3)
            for _ in range(100):  # written within a flush (a bucket's writes take longer)
                if await asyncio.to_thread(waiting, store, feedback) == 3:
                    break
                await asyncio.sleep(0.1)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        return time.monotonic() - started

    took_s = asyncio.run(trickle(Capture(store, CaptureOptions(feedback, below=0.5, flush_s=0.4), metrics), 30))
    names = store.listdir(join(feedback, "records"))
    assert 2 <= len(names) <= took_s / 0.4 + 1  # 30 records over 1.5 s or so: a file each 0.4 s, not one a record
    assert sum(capture.records_in(n) for n in names) == 30 == waiting(store, feedback)

    def review() -> None:
        out = tmp_path / "review"
        make_review(store, feedback, out)
        submit_review(store, feedback, out, join(root, "incoming"), "feedback-t", None)
        freed = compact_records(store, feedback)  # the room a review makes
        assert (freed.records_freed, freed.files_after) == (30, 0)

    monkeypatch.setattr(capture, "MAX_RECORDS", 30)  # full: a server started now keeps nothing
    keeper = Capture(store, CaptureOptions(feedback, below=0.5, flush_s=0.2), metrics)
    asyncio.run(trickle(keeper, 3, then=review))
    assert 'reason="folder_full"} 3.0' in metrics.page().decode()
    assert waiting(store, feedback) == 3  # and keeps records again after a review, without a restart


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
    done = submit_review(store, feedback, out, incoming, "feedback-1", None)
    batch, ledger = done.batch, done.ledger
    assert (ledger.submitted, ledger.relabeled, ledger.deleted) == (4, 1, 1)
    assert ledger.served_versions == {"v0001": 4} and not out.exists()
    with store.local_tree(batch.path) as folder:
        labels = load_batch(folder)[2]
    assert sorted(labels.tolist()) == sorted([0, 3, 7, 1])  # the relabeled image is a sneaker (7) now
    assert waiting(store, feedback) == 0  # submitted and deleted records are not offered again
    assert len(reviewed_by(store, feedback)) == 5
    captured(store, feedback, images[:1], np.array([0]), np.array([0.5]))  # a later file, unreviewed
    assert compact_records(store, feedback).records_freed == 5 and waiting(store, feedback) == 1
    assert len(store.listdir(join(feedback, "records"))) == 1
    # The lineage: the batch of that name and content counts; another batch of the same name would not.
    lineage = feedback_lineage(store, feedback, {"feedback-1": batch.sha256, "hand-made": "e" * 64})
    assert (lineage.reviewed_batches, lineage.reviewed_images, lineage.served_versions) == (
        ["feedback-1"],
        4,
        {"v0001": 4},
    )
    assert feedback_lineage(store, feedback, {"feedback-1": "f" * 64}).reviewed_batches == []
    version = version_manifest("v0002", 0.9)
    version = version.model_copy(
        update={"data": version.data.model_copy(update={"feedback": FeedbackRecord.of(lineage)})}
    )
    card = model_card(version)
    assert "4 of them reviewed feedback from the served versions v0001 (4), in feedback-1" in card


def test_a_submit_that_stopped_before_its_ledger_is_finished_by_the_next(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    captured(store, feedback, synthetic_images(np.array([2, 4, 6]), seed=35), np.array([2, 4, 6]), np.full(3, 0.4))
    out = tmp_path / "review"
    make_review(store, feedback, out)
    create = Store.create

    def lost(self: Store, location: str, data: bytes) -> None:
        if "/reviewed/" in location:
            raise OSError("the host went away")
        create(self, location, data)

    monkeypatch.setattr(Store, "create", lost)
    with pytest.raises(OSError, match="went away"):
        submit_review(store, feedback, out, incoming, None, None)
    [added] = store.listdir(incoming)  # the batch is in, its records are not marked, the folder is kept
    assert not reviewed_by(store, feedback) and (out / INDEX).exists()
    monkeypatch.setattr(Store, "create", create)
    done = submit_review(store, feedback, out, incoming, None, None)
    assert done.batch.name == added and store.listdir(incoming) == [added] and done.ledger.submitted == 3
    assert waiting(store, feedback) == 0 and len(reviewed_by(store, feedback)) == 3 and not out.exists()


def test_review_refuses_a_damaged_ledger_or_index_naming_the_file(root: str, store: Store, tmp_path: Path) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    captured(store, feedback, synthetic_images(np.array([1, 3]), seed=36), np.array([1, 3]), np.full(2, 0.4))
    out = tmp_path / "review"
    make_review(store, feedback, out)
    index = (out / INDEX).read_text()
    (out / INDEX).write_text(index.replace(index.splitlines()[1].split(",")[1], "../../etc"))
    with pytest.raises(ReviewError, match=r"index\.csv: not the records offer [0-9a-f]{32} holds"):
        submit_review(store, feedback, out, incoming, "feedback-x", None)
    assert not store.find(incoming)  # refused before anything was added
    (out / INDEX).write_text(index)
    submit_review(store, feedback, out, incoming, "feedback-x", None)
    store.write_bytes(ledger_location(feedback, "feedback-x"), b'{"batch": "feedback-x", "records": [{"id": 7}]}')
    with pytest.raises(ReviewError, match=r"feedback-x\.json: not a review ledger"):
        make_review(store, feedback, tmp_path / "again")
    lineage = feedback_lineage(store, feedback, {"feedback-x": "0" * 64})
    assert lineage.unreadable_ledgers == ["feedback-x"] and lineage.reviewed_images == 0


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
        assert not store.find(incoming) and not reviewed_by(store, feedback)  # nothing added, nothing marked
        shutil.rmtree(out)
        snapshot.rename(out)


@pytest.mark.processes
def test_a_server_captures_what_it_answers_only_when_asked(tmp_path: Path) -> None:
    registry = write_stub_registry(tmp_path / "registry")
    data_root = tmp_path / "data"
    images = synthetic_images(np.arange(10, dtype=np.uint8), seed=33)
    options = ("--capture-rate", "1", "--data-root", str(data_root))
    with running_server(registry.root, tmp_path / "serve.log", None, *options, stub=True) as server:
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
    expected = stub_probabilities(registry, "v0001", images)
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
        registry.root, tmp_path / "serve-off.log", None, "--data-root", str(tmp_path / "off"), stub=True
    ) as server:
        assert httpx.post(f"{server.url}{PREDICT}", json={"instances": images.tolist()}).status_code == 200
    assert not (tmp_path / "off" / "feedback").exists()  # capture is off unless asked for
