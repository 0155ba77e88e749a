"""Quarantine and the incoming folder's names, on local disk and in a bucket: odd names are refused the same
way by a run as by add-batch, what quarantine moves arrives whole, what it cannot move stays, and no odd
name (globs, bytes that are not UTF-8, names too long for a disk) can fail every run or touch another batch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import incoming
from fmnist.data.incoming import QUARANTINE_NOTE, Disposal, QuarantineError, dispose, quarantine, screen_incoming
from fmnist.storage import Store, join
from tests.helpers import synthetic_images, write_idx_batch


def put_batch(store: Store, tmp_path: Path, location: str, seed: int, rows: int = 5) -> None:
    """A readable IDX batch at `location` (a folder on disk, or keys in a bucket)."""
    labels = np.arange(rows, dtype=np.uint8) % 10
    folder = write_idx_batch(tmp_path / "made" / str(seed), synthetic_images(labels, seed=seed), labels)
    for path in folder.iterdir():
        store.put_file(path, join(location, path.name))


def quarantine_all(store: Store, root: str) -> dict[str, str]:
    """Screen `root/in` and quarantine every refused batch; each refused name and where it went."""
    screening = screen_incoming(store, join(root, "in"), contract=False)
    return {r.name: quarantine(store, r, join(root, "quarantine"), "by the test") for r in screening.refused}


def test_glob_names_are_refused_by_a_run_and_quarantine_touches_no_other_batch(
    store: Store, root: str, tmp_path: Path
) -> None:
    """On S3, quarantining `shoes[1]` deleted the good `shoes1`, and `bad*` deleted `bad-day` and `badges`."""
    good = ["shoes1", "bad-day", "badges", "qx"]
    for seed, name in enumerate([*good, "shoes[1]", "bad*", "q?"]):
        put_batch(store, tmp_path, join(root, "in", name), seed)
    moved = quarantine_all(store, root)
    assert sorted(moved) == ["bad*", "q?", "shoes[1]"]
    assert store.listdir(join(root, "in")) == sorted(good)
    for name in good:
        assert sorted(store.find(join(root, "in", name))) == [
            "batch-images-idx3-ubyte.gz",
            "batch-labels-idx1-ubyte.gz",
        ]
    for name, where in moved.items():
        note = store.read_bytes(join(where, QUARANTINE_NOTE)).decode()
        assert "not a batch name" in note and repr(name) in note
        assert where.rsplit("/", 1)[1].startswith("unnamed-")  # never the odd name itself
        assert sorted(store.find(where)) == [
            QUARANTINE_NOTE,
            "batch-images-idx3-ubyte.gz",
            "batch-labels-idx1-ubyte.gz",
        ]


def test_a_stray_file_is_quarantined_with_its_content(store: Store, root: str) -> None:
    """In a bucket a stray file became a QUARANTINED.txt and its content was deleted; on disk the run
    crashed with FileExistsError. (A file that is no batch's, a `notes.zip`, is left where it is.)"""
    store.write_bytes(join(root, "in", "shoe.png"), b"\x89PNG someone's image")
    store.write_bytes(join(root, "in", "notes.zip"), b"PK\x03\x04 someone's notes")
    screening = screen_incoming(store, join(root, "in"), contract=False)
    [refused] = screening.refused
    assert "put each batch in a folder of its own" in refused.error and screening.ignored == ["notes.zip"]
    where = quarantine(store, refused, join(root, "quarantine"), "by the test")
    assert sorted(store.find(where)) == [QUARANTINE_NOTE, "shoe.png"]
    assert store.read_bytes(join(where, "shoe.png")) == b"\x89PNG someone's image"
    assert store.listdir(join(root, "in")) == ["notes.zip"]


def test_a_batch_holding_its_own_quarantined_txt_keeps_it(store: Store, root: str, tmp_path: Path) -> None:
    put_batch(store, tmp_path, join(root, "in", "odd"), 1)
    store.write_bytes(join(root, "in", "odd", "batch-labels-idx1-ubyte.gz"), b"junk")
    store.write_bytes(join(root, "in", "odd", QUARANTINE_NOTE), b"the batch's own file")
    [refused] = screen_incoming(store, join(root, "in"), contract=False).refused
    where = quarantine(store, refused, join(root, "quarantine"), "by the test")
    assert store.read_bytes(join(where, QUARANTINE_NOTE)) == b"the batch's own file"
    assert "by the test" in store.read_bytes(join(where, "QUARANTINED-2.txt")).decode()


def test_two_quarantines_of_one_name_in_one_second_both_arrive(store: Store, root: str) -> None:
    for content in (b"first", b"second"):
        store.write_bytes(join(root, "in", "stray-images-idx3-ubyte"), content)
        [refused] = screen_incoming(store, join(root, "in"), contract=False).refused
        quarantine(store, refused, join(root, "quarantine"), "by the test")
    found = sorted(store.find(join(root, "quarantine")))
    strays = [f for f in found if f.endswith("/stray-images-idx3-ubyte")]
    assert len(strays) == 2
    assert {store.read_bytes(join(root, "quarantine", f)) for f in strays} == {
        b"first",
        b"second",
    }


def test_a_name_too_long_for_a_disk_is_still_quarantined(store: Store, root: str) -> None:
    """A 250-byte name plus the time stamp is over the 255-byte limit of a file name: it could never move."""
    name = "x" * 250
    store.write_bytes(join(root, "in", name, "f.png"), b"not a png")
    moved = quarantine_all(store, root)
    assert list(moved) == [name] and store.listdir(join(root, "in")) == []
    assert store.find(moved[name]) == [QUARANTINE_NOTE, "f.png"]


def test_a_key_that_is_both_a_file_and_a_folder_is_refused_and_moved_whole(
    store: Store, bucket: str, tmp_path: Path
) -> None:
    """Keys `evil/a` and `evil/a/b`: no disk can hold both; quarantine lost `a`."""
    store.write_bytes(join(bucket, "in", "evil", "a"), b"file a")
    store.write_bytes(join(bucket, "in", "evil", "a", "b"), b"file b")
    store.write_bytes(join(bucket, "in", "evil", "bag", "0.png"), b"a batch's image")
    [refused] = screen_incoming(store, join(bucket, "in"), contract=False).refused
    assert "both a file and a folder" in refused.error
    where = quarantine(store, refused, join(bucket, "quarantine"), "by the test")
    assert store.read_bytes(join(where, "a")) == b"file a" and store.read_bytes(join(where, "a", "b")) == b"file b"
    assert store.read_bytes(join(where, "bag", "0.png")) == b"a batch's image"


def test_a_name_that_is_not_utf8_is_refused_and_quarantined(store: Store, tmp_path: Path) -> None:
    """GX's Data Docs raised on such a batch name before quarantine could act: every run failed."""
    folder = tmp_path / "root" / "in"
    folder.mkdir(parents=True)
    odd = os.fsdecode(b"caf\xe9-batch")
    labels = np.arange(5, dtype=np.uint8)
    write_idx_batch(folder / odd, synthetic_images(labels, seed=3), labels)
    [refused] = screen_incoming(store, str(folder), contract=False).refused
    assert "caf\\udce9-batch" in refused.name and "not a batch name" in refused.error
    refused.error.encode("utf-8")  # printable: logs, artifacts and events take it
    where = quarantine(store, refused, str(tmp_path / "root" / "quarantine"), "by the test")
    assert os.listdir(folder) == [] and sorted(os.listdir(where)) == [
        QUARANTINE_NOTE,
        "batch-images-idx3-ubyte.gz",
        "batch-labels-idx1-ubyte.gz",
    ]


def test_what_cannot_be_moved_stays_where_it_is(store: Store, root: str, tmp_path: Path) -> None:
    put_batch(store, tmp_path, join(root, "in", "bad[1]"), 2)
    [refused] = screen_incoming(store, join(root, "in"), contract=False).refused
    if store.direct_path(root) is None:
        blocked = "s3://no-such-bucket-for-fmnist/quarantine"
    else:
        blocked = join(root, "quarantine", "under-a-file")
        Path(root, "quarantine").write_bytes(b"a file where the quarantine folder should be")
    with pytest.raises(QuarantineError, match=r"could not be quarantined .*; left where it is"):
        quarantine(store, refused, blocked, "by the test")
    assert sorted(store.find(join(root, "in", "bad[1]"))) == [
        "batch-images-idx3-ubyte.gz",
        "batch-labels-idx1-ubyte.gz",
    ]


def test_a_bucket_batch_of_too_many_objects_is_refused_from_its_listing(
    store: Store, bucket: str, tmp_path: Path, monkeypatch
) -> None:
    """100,000 tiny objects were downloaded whole (3.4 ms each) before the 100,000-image cap applied."""
    monkeypatch.setattr(incoming, "MAX_BATCH_FILES", 20)
    for n in range(21):
        store.write_bytes(join(bucket, "in", "many", "coat", f"{n:03d}.png"), b"tiny")
    [refused] = screen_incoming(store, join(bucket, "in"), contract=False).refused
    assert refused.error == f"{bucket}/in/many: 21 files, over the 20-file limit for this folder"
    assert not list((tmp_path / "scratch").rglob("*.png"))  # nothing was downloaded


def test_the_bad_batch_policy_stops_moves_or_leaves_and_says_which(store: Store, root: str, tmp_path: Path) -> None:
    for name in ("kept[1]", "moved[2]", "stuck[3]"):
        put_batch(store, tmp_path, join(root, "in", name), 4)
    kept, moved, stuck = screen_incoming(store, join(root, "in"), contract=False).refused
    failing = dispose(store, kept, "fail", join(root, "quarantine"), "by the test")
    assert failing == Disposal(kept, "refused: the run stops") and store.find(join(root, "in", "kept[1]"))
    quarantined = dispose(store, moved, "quarantine", join(root, "quarantine"), "by the test")
    assert quarantined.status == f"quarantined: moved to {quarantined.moved_to}" and not quarantined.left_because
    assert QUARANTINE_NOTE in store.find(quarantined.moved_to) and not store.find(join(root, "in", "moved[2]"))
    if store.direct_path(root) is None:
        blocked = "s3://no-such-bucket-for-fmnist/quarantine"
    else:
        blocked = join(root, "a-file")
        Path(blocked).write_bytes(b"a file where the quarantine folder should be")
    left = dispose(store, stuck, "quarantine", join(blocked, "q"), "by the test")
    assert left.moved_to is None and left.left_because and left.status == f"refused, left in place: {left.left_because}"
    assert store.find(join(root, "in", "stuck[3]"))  # still there, refused again by the next run
