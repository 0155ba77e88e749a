"""The loop's promises under retries and edits: a reviewed record enters training once, ever; every
stopped submit is finished by the same command; the review folder must be what the review offered;
capture can always resume. On disk and in a bucket alike."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from fmnist.data import captured as records
from fmnist.data import offers
from fmnist.data.incoming import INCOMPLETE
from fmnist.data.overlap import KnownImages
from fmnist.ops import review
from fmnist.ops.review import INDEX, ReviewError, compact_records, make_review, reviewed_by, submit_review
from fmnist.serving import capture
from fmnist.serving.capture import Capture, CaptureOptions
from fmnist.serving.metrics import ServingMetrics
from fmnist.storage import Store, join
from tests.feedback_helpers import captured, waiting
from tests.helpers import synthetic_images


def capture_files(store: Store, feedback: str, files: int, per_file: int, seed: int = 50) -> np.ndarray:
    """`files` record files of `per_file` records each, confidences interleaved across the files."""
    images = synthetic_images(np.arange(files * per_file, dtype=np.uint8) % 10, seed=seed)
    confidence = np.linspace(0.15, 0.95, files * per_file, dtype=np.float32).reshape(per_file, files).T
    for f in range(files):
        rows = slice(f * per_file, (f + 1) * per_file)
        captured(store, feedback, images[rows], np.arange(per_file) % 10, confidence[f])
    return images


def index_rows(folder: Path) -> list[dict]:
    with open(folder / INDEX, newline="") as index:
        return list(csv.DictReader(index))


def relabel_first(folder: Path, to: str) -> None:
    """The reviewer moves the first image of the index into `to`'s folder."""
    first = index_rows(folder)[0]["file"]
    (folder / "images" / to).mkdir(exist_ok=True)
    shutil.move(folder / first, folder / "images" / to / Path(first).name)


def test_two_reviews_never_hold_one_record_and_a_copy_of_a_submitted_folder_adds_nothing(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=2, per_file=4)
    monkeypatch.setattr(review, "MAX_REVIEW", 5)
    first, second = make_review(store, feedback, tmp_path / "a"), make_review(store, feedback, tmp_path / "b")
    assert (first.images, first.left, second.images, second.left) == (5, 3, 3, 0)
    ids = [{row["id"] for row in index_rows(tmp_path / name)} for name in "ab"]
    assert not ids[0] & ids[1]  # each record is in one review only
    assert make_review(store, feedback, tmp_path / "c").images == 0  # every record is offered

    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    relabel_first(tmp_path / "a-copy", "bag")  # the copy is labeled otherwise
    done = submit_review(store, feedback, tmp_path / "a", incoming, "feedback-a", None)
    with pytest.raises(ReviewError, match=r"submitted as batch feedback-a already, with other images or labels"):
        submit_review(store, feedback, tmp_path / "a-copy", incoming, "feedback-a2", None)
    assert store.listdir(incoming) == ["feedback-a"] and (tmp_path / "a-copy").exists()
    shutil.rmtree(tmp_path / "a-copy")
    # A copy labeled the same is the same submit: it adds nothing, and its folder goes.
    shutil.copytree(tmp_path / "b", tmp_path / "b-copy")
    submit_review(store, feedback, tmp_path / "b", incoming, "feedback-b", None)
    again = submit_review(store, feedback, tmp_path / "b-copy", incoming, "feedback-b2", None)
    assert again.earlier and again.batch.name == "feedback-b" and not (tmp_path / "b-copy").exists()
    assert sorted(store.listdir(incoming)) == ["feedback-a", "feedback-b"]
    assert len(reviewed_by(store, feedback)) == 8 and done.ledger.submitted == 5
    assert not [n for n in store.listdir(join(feedback, "offers"))]  # both offers closed


@pytest.mark.parametrize("stop", ["mid-copy", "before-ledger", "before-offer-closed", "while-removing"])
def test_a_submit_stopped_anywhere_is_finished_by_the_same_command(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=6, seed=51)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    relabel_first(out, "coat")
    put_file, create, close_offer, rename = Store.put_file, Store.create, offers.close_offer, Path.rename
    copied = []

    def stops(*args, **kwargs):
        raise OSError("the host went away")

    def put_one_then_stop(self: Store, local: Path, location: str) -> None:
        if copied:
            raise OSError("the host went away")
        copied.append(location)
        put_file(self, local, location)

    if stop == "mid-copy":
        monkeypatch.setattr(Store, "put_file", put_one_then_stop)
    elif stop == "before-ledger":
        monkeypatch.setattr(
            Store, "create", lambda s, loc, data: stops() if "/reviewed/" in loc else create(s, loc, data)
        )
    elif stop == "before-offer-closed":
        monkeypatch.setattr(review, "close_offer", stops)
    else:
        monkeypatch.setattr(Path, "rename", lambda s, t: stops() if s == out else rename(s, t))
    with pytest.raises(OSError, match="went away"):
        submit_review(store, feedback, out, incoming, None, None)
    monkeypatch.setattr(Store, "put_file", put_file)
    monkeypatch.setattr(Store, "create", create)
    monkeypatch.setattr(review, "close_offer", close_offer)
    monkeypatch.setattr(Path, "rename", rename)
    if stop == "mid-copy":
        assert store.exists(join(incoming, store.listdir(incoming)[0], INCOMPLETE))  # a partial batch

    done = submit_review(store, feedback, out, incoming, None, None)  # the same command again
    assert store.listdir(incoming) == [done.batch.name] and not store.exists(join(done.batch.path, INCOMPLETE))
    assert done.batch.rows == 6 and done.ledger.submitted == 6 and done.ledger.relabeled == 1
    assert len(reviewed_by(store, feedback)) == 6 and not out.exists()
    assert store.listdir(join(feedback, "offers")) == []
    with pytest.raises(ReviewError, match="no such folder; nothing to submit"):
        submit_review(store, feedback, out, incoming, None, None)


def test_a_stopped_submit_keeps_its_name_and_advises_nothing_that_duplicates(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=4, seed=52)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    monkeypatch.setattr(review, "close_offer", lambda *a: (_ for _ in ()).throw(OSError("the host went away")))
    with pytest.raises(OSError):
        submit_review(store, feedback, out, incoming, "first-name", None)
    monkeypatch.undo()
    with pytest.raises(ReviewError, match=r"being submitted as first-name .* or with --name first-name"):
        submit_review(store, feedback, out, incoming, "other-name", None)
    assert submit_review(store, feedback, out, incoming, None, None).batch.name == "first-name"
    assert store.listdir(incoming) == ["first-name"]


def test_a_review_folder_must_be_what_its_offer_holds(root: str, store: Store, tmp_path: Path) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=4, seed=53)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    rows = index_rows(out)
    text = (out / INDEX).read_text()
    other = synthetic_images(np.array([4]), seed=99)[0]
    spoils = [
        ("an unknown version", lambda: (out / INDEX).write_text(text.replace(",v0001,", ",v9999,", 1)), "has version"),
        ("an id no record has", lambda: (out / INDEX).write_text(text.replace(rows[1]["id"], "f" * 32)), "differ"),
        ("a row removed", lambda: (out / INDEX).write_text("\n".join(text.splitlines()[:-1]) + "\n"), "differ"),
        ("another image", lambda: Image.fromarray(other).save(out / rows[2]["file"]), "not the one it was offered"),
        (
            "an image of no record",
            lambda: Image.fromarray(other).save(out / "images" / "coat" / f"00099-{'e' * 32}.png"),
            "not an image this review offered",
        ),
        ("no offer", lambda: (out / "offer.txt").unlink(), r"offer\.txt: missing or damaged"),
    ]
    for what, spoil, message in spoils:
        snapshot = tmp_path / "snapshot"
        shutil.copytree(out, snapshot)
        (out / "images" / "coat").mkdir(exist_ok=True)
        spoil()
        with pytest.raises(ReviewError, match=message):
            submit_review(store, feedback, out, incoming, "feedback-bad", None)
        assert not store.find(incoming) and not reviewed_by(store, feedback), what  # nothing added or marked
        shutil.rmtree(out)
        snapshot.rename(out)
    (out / INDEX).write_text(text)
    assert submit_review(store, feedback, out, incoming, "feedback-good", None).ledger.submitted == 4


def test_an_offer_nobody_submits_is_released_and_its_late_folder_refused(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=3, seed=54)
    make_review(store, feedback, tmp_path / "forgotten")
    assert waiting(store, feedback) == 0
    monkeypatch.setattr(offers, "OFFER_DAYS", -1)  # as if its days were over
    assert make_review(store, feedback, tmp_path / "new").images == 3  # released to the next review
    with pytest.raises(ReviewError, match="released after"):
        submit_review(store, feedback, tmp_path / "forgotten", incoming, None, None)
    assert submit_review(store, feedback, tmp_path / "new", incoming, None, None).ledger.submitted == 3


def test_the_test_set_refusal_names_the_file(root: str, store: Store, tmp_path: Path) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    images = capture_files(store, feedback, files=1, per_file=3, seed=55)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    test_set = images[1:2]  # one captured image is a test-set image
    known = KnownImages(lambda: test_set, lambda: images[:0], "sets")
    row = next(r for r in index_rows(out) if (np.array(Image.open(out / r["file"])) == test_set[0]).all())
    with pytest.raises(ReviewError, match=rf"its image {row['file'].removeprefix('images/')} is test image 0"):
        submit_review(store, feedback, out, incoming, None, known)


def test_a_review_frees_the_space_of_what_it_reviewed_and_capture_resumes(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file used to go only once every record in it was reviewed: a 50-file folder freed none."""
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=8, per_file=5, seed=56)
    monkeypatch.setattr(review, "MAX_REVIEW", 10)
    monkeypatch.setattr(capture, "MAX_RECORDS", 40)
    keeper = Capture(store, CaptureOptions(feedback, rate=1.0), ServingMetrics("fashion-mnist"))
    asyncio.run(keeper.count())
    assert keeper.full()
    out = tmp_path / "review"
    make_review(store, feedback, out)
    done = submit_review(store, feedback, out, incoming, None, None)
    freed = compact_records(store, feedback)
    assert (freed.records_freed, freed.files_before) == (10, 8)
    names = store.listdir(join(feedback, "records"))
    assert sum(records.records_in(n) for n in names) == 30 == waiting(store, feedback)
    assert len(names) == 1  # the small files merged
    asyncio.run(keeper.count())
    assert not keeper.full()  # room for as many records as were reviewed
    assert not {r.id for r in done.ledger.records} & {
        i for n in names for i in records.read_table(store, feedback, n, ["id"])["id"].to_pylist()
    }


def test_a_compaction_stopped_midway_is_finished_by_the_next(root: str, store: Store, tmp_path: Path) -> None:
    feedback = join(root, "feedback")
    capture_files(store, feedback, files=1, per_file=6, seed=57)
    [name] = store.listdir(join(feedback, "records"))
    table = records.read_table(store, feedback, name)
    reviewed = set(table["id"].to_pylist()[:2])
    stamp, tag, _ = records.RECORD_FILE.fullmatch(name).groups()
    kept = records.record_file_name(4, stamp, tag)  # written, and the old file not yet deleted
    store.write_bytes(join(feedback, "records", kept), records.encode(table.slice(2)))
    assert waiting(store, feedback) == 4  # the newer file is what is left; no record is counted twice
    assert make_review(store, feedback, tmp_path / "review").images == 4
    compacted = records.compact(store, feedback, reviewed)
    assert store.listdir(join(feedback, "records")) == [kept] and compacted.files_after == 1


def test_a_stopping_server_waits_for_its_last_records_a_bounded_time_and_counts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that hung at shutdown held the stop, and the records vanished uncounted."""
    hung = threading.Event()
    monkeypatch.setattr(Store, "write_bytes", lambda *a: hung.wait(60))
    monkeypatch.setattr(capture, "STOP_WRITE_S", 0.5)
    metrics = ServingMetrics("fashion-mnist")
    keeper = Capture(Store(), CaptureOptions(str(tmp_path / "feedback"), rate=1.0, flush_s=60), metrics)
    images = synthetic_images(np.arange(3, dtype=np.uint8), seed=58).astype(np.float32) / 255

    async def serve_then_stop() -> float:
        writer = asyncio.create_task(keeper.run())
        await asyncio.sleep(0.2)
        keeper.offer(images, np.full((3, 10), 0.1, np.float32), "v0001", "stable")
        started = time.monotonic()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        return time.monotonic() - started

    took_s = asyncio.run(serve_then_stop())
    hung.set()
    assert took_s < 5  # not the store's 60 s
    assert 'fashion_mnist_feedback_dropped_total{reason="stopped"} 3.0' in metrics.page().decode()


def test_a_copy_labeled_otherwise_is_refused_while_the_first_submit_is_stopped_and_strays_go(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copiers of one offer once deleted each other's partial batch: 600 of 2,000 records lost."""
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=5, seed=60)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    shutil.copytree(out, tmp_path / "copy")
    relabel_first(tmp_path / "copy", "bag")
    put_file = Store.put_file
    monkeypatch.setattr(Store, "put_file", lambda *a: (_ for _ in ()).throw(OSError("the host went away")))
    with pytest.raises(OSError):
        submit_review(store, feedback, out, incoming, "first", None)
    monkeypatch.setattr(Store, "put_file", put_file)
    [partial] = store.listdir(incoming)
    store.write_bytes(join(incoming, partial, "strays", "bag", "00009-" + "a" * 32 + ".png"), b"a stray")
    with pytest.raises(ReviewError, match="being submitted as batch first with other images or labels"):
        submit_review(store, feedback, tmp_path / "copy", incoming, None, None)
    done = submit_review(store, feedback, out, incoming, None, None)
    assert done.batch.rows == 5 and not [f for f in store.find(done.batch.path) if "/bag/" in f]


def test_a_damaged_offer_is_rebuilt_by_its_submit_or_released_if_none_began(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its error once advised deleting it, and the same records went into a second batch."""
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=6, seed=61)
    monkeypatch.setattr(review, "MAX_REVIEW", 3)
    begun, idle = tmp_path / "begun", tmp_path / "idle"
    make_review(store, feedback, begun)
    make_review(store, feedback, idle)
    create = Store.create
    monkeypatch.setattr(
        Store,
        "create",
        lambda s, loc, d: (_ for _ in ()).throw(OSError("gone")) if "/reviewed/" in loc else create(s, loc, d),
    )
    with pytest.raises(OSError):
        submit_review(store, feedback, begun, incoming, "first", None)  # the batch is in, no ledger
    monkeypatch.setattr(Store, "create", create)
    for folder in (begun, idle):
        offer = (folder / "offer.txt").read_text().strip()
        store.write_bytes(offers.offer_location(feedback, offer), b'{"offer": "torn')
    with pytest.raises(ReviewError, match="its submit began, as batch first: run `fashion-mnist review --submit`"):
        make_review(store, feedback, tmp_path / "third")
    done = submit_review(store, feedback, begun, incoming, None, None)  # rebuilt from the record files
    assert done.batch.name == "first" and store.listdir(incoming) == ["first"] and done.ledger.submitted == 3
    assert make_review(store, feedback, tmp_path / "third").images == 3  # the idle offer was released
    with pytest.raises(ReviewError, match="not in the store"):
        submit_review(store, feedback, idle, incoming, None, None)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda text: text.replace("\n", ",extra\n", 2),  # a trailing field on a row
        lambda text: (
            text.replace("at\n", "at,source\n", 1).replace("\n", ",x\n").replace("at,source,x\n", "at,source\n")
        ),
        lambda text: text + "\n".join(text.splitlines()[1:2] * 3000),  # rows past a review's size
    ],
    ids=["trailing-field", "extra-column", "too-many-rows"],
)
def test_an_index_with_other_columns_or_rows_is_refused_before_anything_is_added(
    root: str, store: Store, tmp_path: Path, spoil
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=1, per_file=3, seed=62)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    (out / INDEX).write_text(spoil((out / INDEX).read_text()))
    with pytest.raises(ReviewError, match=r"index\.csv: not the index `fashion-mnist review` wrote"):
        submit_review(store, feedback, out, incoming, None, None)
    assert not store.find(incoming)


@pytest.mark.parametrize(
    ("field", "value"), [("id", "/../../../../escaped"), ("predicted", 100), ("version", "../v1"), ("confidence", 7.0)]
)
def test_a_record_capture_did_not_write_is_refused_naming_its_file_and_writes_nothing(
    tmp_path: Path, field: str, value
) -> None:
    store, feedback = Store(), str(tmp_path / "feedback")
    capture_files(store, feedback, files=1, per_file=3, seed=63)
    [name] = store.listdir(join(feedback, "records"))
    table = records.read_table(store, feedback, name)
    column = table[field].to_pylist()
    column[0] = value
    spoiled = table.set_column(
        table.schema.get_field_index(field), field, pa.array(column, table.schema.field(field).type)
    )
    store.write_bytes(join(feedback, "records", name), records.encode(spoiled))
    out = tmp_path / "deep" / "er" / "review"
    with pytest.raises(ReviewError, match=rf"{name}: a record capture did not write \({field}"):
        make_review(store, feedback, out)
    assert not out.exists() and not list(tmp_path.rglob("*.png"))


def test_a_review_frees_its_records_after_another_compaction_merged_their_files(
    root: str, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feedback, incoming = join(root, "feedback"), join(root, "incoming")
    capture_files(store, feedback, files=6, per_file=4, seed=64)
    monkeypatch.setattr(review, "MAX_REVIEW", 5)
    make_review(store, feedback, tmp_path / "a")
    make_review(store, feedback, tmp_path / "b")
    submit_review(store, feedback, tmp_path / "a", incoming, "a", None)
    assert compact_records(store, feedback).files_after == 1  # merged: b's records' files are gone
    submit_review(store, feedback, tmp_path / "b", incoming, "b", None)
    assert compact_records(store, feedback).records_freed == 5
    assert (
        waiting(store, feedback) == 14 == sum(records.records_in(n) for n in store.listdir(join(feedback, "records")))
    )


def test_a_merge_stopped_before_its_sources_went_is_finished_by_the_next_compaction(
    root: str, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    feedback = join(root, "feedback")
    capture_files(store, feedback, files=4, per_file=3, seed=65)
    delete = Store.delete
    monkeypatch.setattr(
        Store, "delete", lambda s, loc: (_ for _ in ()).throw(OSError("gone")) if "/records/" in loc else delete(s, loc)
    )
    with pytest.raises(OSError):
        records.compact(store, feedback, set())
    monkeypatch.setattr(Store, "delete", delete)
    assert len(store.listdir(join(feedback, "records"))) == 5  # the merged file beside its sources
    records.compact(store, feedback, set())
    names = store.listdir(join(feedback, "records"))
    assert len(names) == 1 and records.records_in(names[0]) == 12 == waiting(store, feedback)


def test_a_review_stopped_before_its_offer_leaves_no_reservation_and_hostile_folders_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, feedback, incoming = Store(), str(tmp_path / "feedback"), str(tmp_path / "incoming")
    capture_files(store, feedback, files=1, per_file=3, seed=66)
    monkeypatch.setattr(review, "write_offer", lambda *a: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(OSError):
        make_review(store, feedback, tmp_path / "stopped")
    monkeypatch.undo()
    assert waiting(store, feedback) == 3  # nothing reserved by an offer no folder holds
    with pytest.raises(ReviewError, match="not in the store"):
        submit_review(store, feedback, tmp_path / "stopped", incoming, None, None)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ReviewError, match="a-file: not a folder"):
        make_review(store, feedback, tmp_path / "a-file")
    with pytest.raises(ReviewError, match="a-file: not a folder"):
        submit_review(store, feedback, tmp_path / "a-file", incoming, None, None)
    out = tmp_path / "review"
    make_review(store, feedback, out)
    (out / "offer.txt").write_bytes(b"0" * (150 << 20))
    with pytest.raises(ReviewError, match=r"offer\.txt: missing or damaged"):
        submit_review(store, feedback, out, incoming, None, None)
    (out / "offer.txt").unlink()
    (out / "offer.txt").mkdir()
    with pytest.raises(ReviewError, match=r"offer\.txt: missing or damaged"):
        submit_review(store, feedback, out, incoming, None, None)
    store.write_bytes(join(feedback, "records", "notes \udcff.parquet"), b"not capture's")
    assert waiting(store, feedback) == 0  # a file capture did not name is neither read nor counted as records
