"""Incoming batches: IDX pairs and PNG class folders join the training set; bad ones are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist.data.contract import DataValidationError
from fmnist.data.incoming import INCOMPLETE, IncomingBatchError, add_batch, collect_incoming, load_collected
from fmnist.ops import cli
from fmnist.storage import Store
from tests.helpers import synthetic_images, write_idx_batch


def write_png_batch(folder: Path, per_class: dict[str, int], size: int = 28, mode: str = "L") -> Path:
    for class_name, count in per_class.items():
        (folder / class_name).mkdir(parents=True)
        for i in range(count):
            Image.new(mode, (size, size), color=i * 10).save(folder / class_name / f"{i}.png")
    return folder


def test_missing_incoming_folder_means_no_batches(tmp_path: Path, store: Store) -> None:
    assert collect_incoming(store, str(tmp_path / "absent")) == []


def test_idx_and_png_batches_are_collected_in_name_order(tmp_path: Path, store: Store) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx_batch(tmp_path / "b-idx", synthetic_images(labels, seed=1), labels)
    write_png_batch(tmp_path / "a-png", {"ankle-boot": 2, "T-shirt_top": 1, "3": 1})
    (tmp_path / ".hidden").mkdir()
    batches = collect_incoming(store, str(tmp_path))
    assert [(b.name, b.kind, b.rows) for b in batches] == [("a-png", "png", 4), ("b-idx", "idx", 5)]
    png_images, png_labels = load_collected(store, batches[0])
    # Class folders in name order: "3" (Dress), "T-shirt_top" (0), "ankle-boot" (9).
    assert png_labels.tolist() == [3, 0, 9, 9]
    assert png_images.shape == (4, 28, 28) and png_images.dtype == np.uint8
    _, idx_labels = load_collected(store, batches[1])
    np.testing.assert_array_equal(idx_labels, labels)


def test_same_content_same_hash_whatever_the_folder(tmp_path: Path, store: Store) -> None:
    labels = np.array([0, 1], dtype=np.uint8)
    images = synthetic_images(labels, seed=2)
    write_idx_batch(tmp_path / "in-1" / "one", images, labels)
    write_idx_batch(tmp_path / "in-2" / "two", images, labels)
    [one] = collect_incoming(store, str(tmp_path / "in-1"))
    [two] = collect_incoming(store, str(tmp_path / "in-2"))
    assert one.sha256 == two.sha256


def test_batch_changed_after_collection_is_refused(tmp_path: Path, store: Store) -> None:
    labels = np.array([0, 1], dtype=np.uint8)
    write_idx_batch(tmp_path / "b", synthetic_images(labels, seed=2), labels)
    [batch] = collect_incoming(store, str(tmp_path))
    write_idx_batch(tmp_path / "b", synthetic_images(labels, seed=3), labels)
    with pytest.raises(IncomingBatchError, match="batch changed while the run was using it"):
        load_collected(store, batch)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: write_png_batch(d / "b", {"socks": 1}), r"b/socks: not a class name; use one of t-shirt-top"),
        (lambda d: write_png_batch(d / "b", {"bag": 1}, mode="RGB"), r"b/bag/0.png: colour mode RGB"),
        (
            lambda d: (d / "b").mkdir() or (d / "b" / "batch-images-idx3-ubyte").write_bytes(b""),
            r"b: a batch holds either one \*images-idx3-ubyte",
        ),
        (lambda d: (d / "stray.png").write_bytes(b""), r"stray.png: put each batch in a folder of its own"),
        (
            lambda d: (write_png_batch(d / "b", {"bag": 1}), (d / "b" / "bag" / "9.png").write_bytes(b"junk")),
            r"b/bag/9.png: not a PNG image",
        ),
        (
            lambda d: (
                write_png_batch(d / "b", {"bag": 1}),
                Image.new("L", (30, 30)).save(d / "b" / "bag" / "1.png"),
            ),
            r"b/bag/1.png: image is 30x30, unlike the 28x28 images before it",
        ),
    ],
    ids=["unknown-class", "rgb", "images-only", "loose-file", "junk-png", "mixed-sizes"],
)
def test_bad_batches_are_named(tmp_path: Path, store: Store, make, message: str) -> None:
    make(tmp_path)
    with pytest.raises(IncomingBatchError, match=message):
        collect_incoming(store, str(tmp_path))


def test_bad_idx_batch_names_the_file(tmp_path: Path, store: Store) -> None:
    labels = np.array([0, 1, 2], dtype=np.uint8)
    folder = write_idx_batch(tmp_path / "b", synthetic_images(labels, seed=0), labels[:2])
    with pytest.raises(ValueError, match=r"b/batch-labels-idx1-ubyte.gz: 2 labels for the 3 images"):
        collect_incoming(store, str(tmp_path))
    assert folder.is_dir()  # incoming data is never edited or removed


def test_batches_in_a_bucket_are_read_and_errors_name_the_url(
    tmp_path: Path, store: Store, bucket: str, s3_env
) -> None:
    labels = np.array([3, 1, 4], dtype=np.uint8)
    write_idx_batch(tmp_path / "in" / "b-idx", synthetic_images(labels, seed=1), labels)
    write_png_batch(tmp_path / "in" / "a-png", {"bag": 2})
    s3_env.filesystem().put(str(tmp_path / "in") + "/", bucket.removeprefix("s3://") + "/incoming/", recursive=True)
    local = collect_incoming(store, str(tmp_path / "in"))
    remote = collect_incoming(store, f"{bucket}/incoming")
    assert [(b.name, b.kind, b.rows, b.sha256) for b in remote] == [(b.name, b.kind, b.rows, b.sha256) for b in local]
    assert remote[1].path == f"{bucket}/incoming/b-idx"
    np.testing.assert_array_equal(load_collected(store, remote[1])[1], labels)

    s3_env.filesystem().pipe_file(bucket.removeprefix("s3://") + "/incoming/c-bad/bag/0.png", b"junk")
    with pytest.raises(IncomingBatchError, match=rf"{bucket}/incoming/c-bad/bag/0\.png: not a PNG image"):
        collect_incoming(store, f"{bucket}/incoming")


def snapshot(store: Store, location: str) -> dict[str, bytes]:
    return {name: store.read_bytes(f"{location}/{name}") for name in store.find(location)}


def test_add_batch_copies_a_checked_batch_whole(data_layout, store: Store, tmp_path: Path) -> None:
    incoming = f"{data_layout.root}/incoming"
    labels = np.arange(20, dtype=np.uint8) % 10
    source = write_idx_batch(tmp_path / "shoes", synthetic_images(labels, seed=3), labels)
    (source / ".DS_Store").write_bytes(b"finder litter")
    added = add_batch(store, source, incoming, name="shoes-2026-11")
    assert (added.name, added.kind, added.rows) == ("shoes-2026-11", "idx", 20)
    [collected] = collect_incoming(store, incoming)
    assert collected == added
    assert sorted(store.find(incoming)) == [
        "shoes-2026-11/batch-images-idx3-ubyte.gz",
        "shoes-2026-11/batch-labels-idx1-ubyte.gz",
    ]


def test_add_batch_refuses_what_the_flow_would_refuse_and_changes_nothing(
    data_layout, store: Store, tmp_path: Path
) -> None:
    incoming = f"{data_layout.root}/incoming"
    good = np.array([1, 2], dtype=np.uint8)
    add_batch(store, write_idx_batch(tmp_path / "good", synthetic_images(good, seed=1), good), incoming)
    before = snapshot(store, incoming)

    labels = np.array([3, 10, 4], dtype=np.uint8)
    bad = write_idx_batch(tmp_path / "bad", synthetic_images(labels % 10, seed=2), labels)
    with pytest.raises(
        DataValidationError, match=r"raw-incoming-bad: expect_column_values_to_be_between\(column=label"
    ):
        add_batch(store, bad, incoming)
    with pytest.raises(IncomingBatchError, match="already there"):
        add_batch(store, tmp_path / "good", incoming)
    with pytest.raises(IncomingBatchError, match="batch name"):
        add_batch(store, tmp_path / "good", incoming, name="../escape")
    with pytest.raises(IncomingBatchError, match="not a folder"):
        add_batch(store, tmp_path / "absent", incoming)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncomingBatchError, match="either one"):
        add_batch(store, tmp_path / "empty", incoming)
    assert snapshot(store, incoming) == before


def test_a_batch_still_being_copied_is_left_out(tmp_path: Path, store: Store) -> None:
    labels = np.array([1, 2], dtype=np.uint8)
    write_idx_batch(tmp_path / "in" / "half-copied", synthetic_images(labels, seed=1), labels)
    (tmp_path / "in" / "half-copied" / INCOMPLETE).write_text("being copied")
    write_idx_batch(tmp_path / "in" / "whole", synthetic_images(labels, seed=2), labels)
    assert [b.name for b in collect_incoming(store, str(tmp_path / "in"))] == ["whole"]


def test_add_batch_outside_the_project_folder_refuses_until_told_the_storage(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Run from elsewhere, add-batch created <cwd>/data/incoming, said the next scheduled run would include
    it, and announced a registry (<cwd>/artifacts) that no deployment uses."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("FMNIST_DATA_ROOT", raising=False)
    monkeypatch.delenv("FMNIST_REGISTRY_ROOT", raising=False)
    labels = np.arange(20, dtype=np.uint8) % 10
    source = write_idx_batch(tmp_path / "shoes", synthetic_images(labels, seed=3), labels)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scratch = ["--scratch", str(tmp_path / "scratch")]
    assert cli.main([*scratch, "add-batch", str(source)]) == 1
    assert "is not the project folder (no prefect.yaml)" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []

    monkeypatch.setenv("FMNIST_DATA_ROOT", str(tmp_path / "team" / "data"))
    monkeypatch.setenv("FMNIST_REGISTRY_ROOT", str(tmp_path / "team" / "artifacts"))
    assert cli.main([*scratch, "add-batch", str(source), "--name", "from-env"]) == 0
    assert f"Adding to {tmp_path}/team/data/incoming" in capsys.readouterr().out
    assert (tmp_path / "team" / "data" / "incoming" / "from-env").is_dir()

    project = tmp_path / "project"
    project.mkdir()
    (project / "prefect.yaml").write_text("name: fashion-mnist-pipeline\n")
    monkeypatch.delenv("FMNIST_DATA_ROOT")
    monkeypatch.delenv("FMNIST_REGISTRY_ROOT")
    monkeypatch.chdir(project)
    assert cli.main([*scratch, "add-batch", str(source), "--name", "in-project"]) == 0
    assert f"from the project folder {project}" in capsys.readouterr().out
    assert (project / "data" / "incoming" / "in-project").is_dir() and list(elsewhere.iterdir()) == []


def counting_reads(monkeypatch) -> list[str]:
    """The names of the batches screening reads (decodes), in order."""
    from fmnist.data import incoming

    read: list[str] = []
    real_read_batch = incoming.read_batch

    def counting(store, location):
        read.append(location.rsplit("/", 1)[-1])
        return real_read_batch(store, location)

    monkeypatch.setattr(incoming, "read_batch", counting)
    return read


def known_sets(identity: str = "sets-1"):
    from fmnist.data.overlap import KnownImages

    train = synthetic_images(np.arange(10, dtype=np.uint8), seed=1)
    return train, KnownImages(lambda: synthetic_images(np.arange(10, dtype=np.uint8), seed=2), lambda: train, identity)


def test_screening_reads_a_batch_once_and_again_only_when_its_files_change(
    root: str, store: Store, tmp_path: Path, monkeypatch
) -> None:
    """Receipts: a run screens what is new or changed; what it says of the others (repeats too) is kept."""
    from fmnist.data import incoming
    from fmnist.data.overlap import KnownImages
    from fmnist.storage import join

    train, known = known_sets()
    labels = np.arange(3, dtype=np.uint8)
    for name, images in (
        ("a", synthetic_images(labels, seed=3)),
        ("b", train[:3]),
        ("c", synthetic_images(labels, seed=3)),
    ):
        write_idx_batch(tmp_path / name, images, labels)
        store.put_tree(tmp_path / name, join(root, "in", name), marker="batch-labels-idx1-ubyte.gz")
    read = counting_reads(monkeypatch)
    receipts = join(root, "receipts")
    first = incoming.screen_incoming(store, join(root, "in"), known, receipts=receipts)
    assert read == ["a", "b", "c"] and [b.name for b in first.batches] == ["a", "b"]
    assert first.repeats == ["b: 3 of its 3 images are already in the training set"]
    assert [r.name for r in first.refused] == ["c"] and "already in a batch used before it" in first.refused[0].error
    read.clear()
    again = incoming.screen_incoming(store, join(root, "in"), known, receipts=receipts)
    assert read == [] and again == first  # the repeat found again from the receipts, no batch read
    changed = synthetic_images(labels, seed=4)
    write_idx_batch(tmp_path / "c", changed, labels)
    store.put_file(tmp_path / "c" / "batch-images-idx3-ubyte.gz", join(root, "in", "c", "batch-images-idx3-ubyte.gz"))
    third = incoming.screen_incoming(store, join(root, "in"), known, receipts=receipts)
    assert read == ["c"] and [b.name for b in third.batches] == ["a", "b", "c"] and not third.refused
    assert third.repeats == first.repeats
    read.clear()
    other_sets = KnownImages(known._test_images, known._train_images, "sets-2")  # screened against other sets
    incoming.screen_incoming(store, join(root, "in"), other_sets, receipts=receipts)
    assert read == ["a", "b", "c"]


def write_plain_idx_batch(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """An IDX batch uncompressed: other labels make a file of the same size."""
    from fmnist.data.idx import encode_idx

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batch-images-idx3-ubyte").write_bytes(encode_idx(images))
    (folder / "batch-labels-idx1-ubyte").write_bytes(encode_idx(labels))
    return folder


def test_a_batch_edited_in_place_with_its_stamp_kept_is_screened_again(
    root: str, store: Store, tmp_path: Path, monkeypatch
) -> None:
    """`cp --preserve=timestamps` onto the old file kept size, modification time and inode: the receipt
    still vouched, the run trained on the old labels (cache intact), or failed every night with "batch
    changed while the run was using it" (cache gone), and the batch was never screened again."""
    import os
    import time

    from fmnist.data.incoming import content_sha256, screen_incoming
    from fmnist.storage import SETTLE_S, join

    _, known = known_sets()
    images = synthetic_images(np.arange(10, dtype=np.uint8), seed=5)
    old, new = np.arange(10, dtype=np.uint8), np.arange(10, dtype=np.uint8)[::-1].copy()
    write_plain_idx_batch(tmp_path / "old", images, old)
    write_plain_idx_batch(tmp_path / "new", images, new)
    batch, receipts = join(root, "in", "shoes"), join(root, "receipts")
    store.put_tree(tmp_path / "old", batch, marker="batch-labels-idx1-ubyte")
    labels_file = join(batch, "batch-labels-idx1-ubyte")
    if store.direct_path(root) is not None:
        time.sleep(SETTLE_S + 0.2)  # a settled stamp: the receipt vouches by it alone
    read = counting_reads(monkeypatch)
    [first] = screen_incoming(store, join(root, "in"), known, receipts=receipts).batches
    assert first.sha256 == content_sha256(images, old) and read == ["shoes"]
    assert store.read_json(first.receipt)["settled"] is True

    if (path := store.direct_path(labels_file)) is not None:  # the content rewritten, its times set back
        before = os.stat(path)
        with open(path, "r+b") as f:
            f.write((tmp_path / "new" / "batch-labels-idx1-ubyte").read_bytes())
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    else:  # a bucket has no way to keep an object's stamp: a write of the same size
        store.put_file(tmp_path / "new" / "batch-labels-idx1-ubyte", labels_file)
    [second] = screen_incoming(store, join(root, "in"), known, receipts=receipts).batches
    assert read == ["shoes", "shoes"] and second.sha256 == content_sha256(images, new)
    np.testing.assert_array_equal(load_collected(store, second)[1], new)  # no "batch changed" failure


def test_a_batch_changed_under_a_run_is_screened_again_by_the_next(root: str, store: Store, tmp_path: Path) -> None:
    """Whatever a stamp missed, a run that finds a batch other than screening saw drops its receipt: the
    next run screens it again, and no night after fails the same way."""
    from fmnist.data.incoming import screen_incoming
    from fmnist.storage import join

    _, known = known_sets()
    labels = np.arange(4, dtype=np.uint8)
    write_idx_batch(tmp_path / "one", synthetic_images(labels, seed=6), labels)
    write_idx_batch(tmp_path / "two", synthetic_images(labels, seed=7), labels)
    batch, receipts = join(root, "in", "b"), join(root, "receipts")
    store.put_tree(tmp_path / "one", batch, marker="batch-labels-idx1-ubyte.gz")
    [screened] = screen_incoming(store, join(root, "in"), known, receipts=receipts).batches
    assert screened.receipt and store.exists(screened.receipt)
    store.put_file(tmp_path / "two" / "batch-images-idx3-ubyte.gz", join(batch, "batch-images-idx3-ubyte.gz"))
    with pytest.raises(IncomingBatchError, match=r"changed while the run was using it .* `make retrain-now`"):
        load_collected(store, screened)
    assert not store.exists(screened.receipt)
    [again] = screen_incoming(store, join(root, "in"), known, receipts=receipts).batches
    assert again.sha256 != screened.sha256
    load_collected(store, again)


def test_the_same_image_in_two_batches_is_used_once_and_the_repeat_refused(
    root: str, store: Store, tmp_path: Path
) -> None:
    """Two review folders of the same records were both submitted: 300 of 300 images trained twice, one
    with conflicting labels (trouser vs bag), and screening reported no repeats."""
    from fmnist.data.incoming import dispose, screen_incoming
    from fmnist.storage import join

    labels = np.array([1, 8, 3, 4, 5, 6], dtype=np.uint8)
    images = synthetic_images(labels, seed=8)
    relabeled = labels.copy()
    relabeled[0] = 8  # trouser there, bag here
    fresh = synthetic_images(labels, seed=9)
    batches = {
        "review-1": (images, labels),
        "review-2": (images, relabeled),  # the same records, reviewed twice
        "review-3": (np.concatenate([fresh[:3], images[4:]]), np.concatenate([labels[:3], labels[4:]])),
        "review-4": (fresh[3:], labels[3:]),  # nothing used before
    }
    for name, (batch_images, batch_labels) in batches.items():
        write_idx_batch(tmp_path / name, batch_images, batch_labels)
        store.put_tree(tmp_path / name, join(root, "in", name), marker="batch-labels-idx1-ubyte.gz")
    screening = screen_incoming(store, join(root, "in"), contract=False)
    assert [b.name for b in screening.batches] == ["review-1", "review-4"]
    refused = {r.name: r.error for r in screening.refused}
    assert sorted(refused) == ["review-2", "review-3"]
    assert (
        f"{root}/in/review-2: 6 of its 6 images are already in a batch used before it (6 in batch review-1"
        in (refused["review-2"])
    )
    assert (
        "1 of them are labeled differently there (its image 0 is labeled Bag here and Trouser in review-1)"
        in (refused["review-2"])
    )
    assert "2 of its 5 images are already in a batch used before it (2 in batch review-1" in refused["review-3"]
    assert "labeled differently" not in refused["review-3"] and "`make retrain-now`" in refused["review-3"]
    with pytest.raises(IncomingBatchError, match="2 incoming batches refused"):
        screening.raise_for_refused()
    for repeat in screening.refused:
        dispose(store, repeat, "quarantine", join(root, "quarantine"), "by the test")
    assert store.listdir(join(root, "in")) == ["review-1", "review-4"]
    again = screen_incoming(store, join(root, "in"), contract=False)
    assert [b.name for b in again.batches] == ["review-1", "review-4"] and not again.refused


def test_a_batch_an_earlier_run_used_is_kept_over_a_new_repeat_of_it(
    root: str, store: Store, tmp_path: Path, monkeypatch
) -> None:
    """Earlier means used before: a new batch whose name sorts first does not push out the one trained on."""
    from fmnist.data.incoming import screen_incoming
    from fmnist.storage import join

    _, known = known_sets()
    labels = np.arange(5, dtype=np.uint8)
    write_idx_batch(tmp_path / "b", synthetic_images(labels, seed=10), labels)
    receipts = join(root, "receipts")
    store.put_tree(tmp_path / "b", join(root, "in", "zz-used"), marker="batch-labels-idx1-ubyte.gz")
    assert [b.name for b in screen_incoming(store, join(root, "in"), known, receipts=receipts).batches] == ["zz-used"]
    store.put_tree(tmp_path / "b", join(root, "in", "aa-new"), marker="batch-labels-idx1-ubyte.gz")
    screening = screen_incoming(store, join(root, "in"), known, receipts=receipts)
    assert [b.name for b in screening.batches] == ["zz-used"]
    [refused] = screening.refused
    assert refused.name == "aa-new" and "5 in batch zz-used" in refused.error


def test_an_incoming_folder_of_other_things_is_left_untouched(root: str, store: Store, tmp_path: Path) -> None:
    """`incoming_dir` pointed at a home folder: every entry was moved to quarantine."""
    from fmnist.data.incoming import dispose, screen_incoming
    from fmnist.storage import join

    home = join(root, "home")
    others = {
        "Documents/taxes.txt": b"numbers",
        "Music/band/song.mp3": b"ID3",
        "notes.zip": b"PK\x03\x04",
        "photos/2024/holiday.jpg": b"\xff\xd8",
        "deep/a/b/c/image.png": b"three folders down: no batch's",
    }
    for name, content in others.items():
        store.write_bytes(join(home, name), content)
    labels = np.arange(4, dtype=np.uint8)
    write_idx_batch(tmp_path / "good", synthetic_images(labels, seed=11), labels)
    store.put_tree(tmp_path / "good", join(home, "good"), marker="batch-labels-idx1-ubyte.gz")
    store.write_bytes(join(home, "broken", "batch-images-idx3-ubyte.gz"), b"junk")  # a batch, a bad one
    screening = screen_incoming(store, home, contract=False)
    assert [b.name for b in screening.batches] == ["good"]
    assert screening.ignored == ["Documents", "Music", "deep", "notes.zip", "photos"]
    assert "5 entries hold no batch" in screening.ignored_message(home)
    [refused] = screening.refused
    assert refused.name == "broken"
    dispose(store, refused, "quarantine", join(root, "quarantine"), "by the test")
    assert {name: store.read_bytes(join(home, name)) for name in others} == others
    assert store.listdir(join(root, "quarantine"))[0].startswith("broken-")


@pytest.mark.parametrize("policy", ["quarantine", "fail"])
def test_the_batch_used_first_keeps_its_place_whatever_its_stamp_or_the_night(
    root: str, store: Store, tmp_path: Path, policy: str
) -> None:
    """A `chmod` (a new stamp) made the trained batch new again, and name order quarantined it; under
    `fail`, the refused copy became known the next night and pushed the trained one out."""
    import time

    from fmnist.data.incoming import dispose, screen_incoming
    from fmnist.storage import join

    _, known = known_sets()
    labels = np.arange(10, dtype=np.uint8)
    images = synthetic_images(labels, seed=12)
    relabeled = labels.copy()
    relabeled[0] = 8
    receipts, incoming = join(root, "receipts"), join(root, "in")
    write_idx_batch(tmp_path / "used", images, labels)
    write_idx_batch(tmp_path / "copy", images, relabeled)
    store.put_tree(tmp_path / "used", join(incoming, "zz-used"), marker="batch-labels-idx1-ubyte.gz")
    assert [b.name for b in screen_incoming(store, incoming, known, receipts=receipts).batches] == ["zz-used"]
    store.put_tree(tmp_path / "copy", join(incoming, "aa-new"), marker="batch-labels-idx1-ubyte.gz")
    for name in store.find(join(incoming, "zz-used")):  # the same bytes again: a restore, a cp -p, a chmod
        time.sleep(0.01)
        store.write_bytes(join(incoming, "zz-used", name), store.read_bytes(join(incoming, "zz-used", name)))
    for night in (2, 3):
        screening = screen_incoming(store, incoming, known, receipts=receipts)
        assert [b.name for b in screening.batches] == ["zz-used"], f"night {night}"
        [refused] = screening.refused
        assert refused.name == "aa-new" and "labeled differently" in refused.error
        if policy == "quarantine":
            dispose(store, refused, policy, join(root, "quarantine"), "by the test")
            assert not store.find(join(incoming, "aa-new"))
            break


def test_a_home_folder_is_never_emptied_into_quarantine(root: str, store: Store) -> None:
    from fmnist.data.incoming import dispose, screen_incoming
    from fmnist.storage import join

    home = join(root, "home")
    store.write_bytes(join(home, "Documents", "1"), b"a file named like a class")
    store.write_bytes(join(home, "Pictures", "2024", "holiday.png"), b"\x89PNG")
    store.write_bytes(join(home, "Desktop", "screenshot.png"), b"\x89PNG")
    screening = screen_incoming(store, home, contract=False)
    assert screening.ignored == ["Documents"]
    assert sorted(r.name for r in screening.refused) == ["Desktop", "Pictures"]
    for refused in screening.refused:
        disposal = dispose(store, refused, "quarantine", join(root, "quarantine"), "by the test")
        assert disposal.moved_to is None and "not laid out as a batch" in disposal.left_because
    assert sorted(store.listdir(home)) == ["Desktop", "Documents", "Pictures"] and not store.find(
        join(root, "quarantine")
    )


def test_a_fresh_batch_with_a_hidden_special_file_is_screened(tmp_path: Path, store: Store) -> None:
    """Its receipt hashed the hidden FIFO the reader skips, and the whole screening stopped."""
    import os

    from fmnist.data.incoming import screen_incoming

    _, known = known_sets()
    labels = np.arange(3, dtype=np.uint8)
    write_idx_batch(tmp_path / "in" / "good", synthetic_images(labels, seed=13), labels)
    os.mkfifo(tmp_path / "in" / "good" / ".pipe")
    screening = screen_incoming(store, str(tmp_path / "in"), known, receipts=str(tmp_path / "receipts"))
    assert [b.name for b in screening.batches] == ["good"] and not screening.refused


@pytest.mark.parametrize("forged", [{"in_training": "3"}, {"rows": 0, "digests": "", "labels": ""}])
def test_a_receipt_not_as_screening_writes_it_is_read_again(tmp_path: Path, store: Store, forged: dict) -> None:
    import json
    import time

    from fmnist.data.incoming import screen_incoming

    _, known = known_sets()
    labels = np.arange(4, dtype=np.uint8)
    for name in ("a", "b"):  # b: a copy of a
        write_idx_batch(tmp_path / "in" / name, synthetic_images(labels, seed=14), labels)
    time.sleep(2.1)  # settled: the receipts are trusted by their stamps alone
    receipts = tmp_path / "receipts"
    first = screen_incoming(store, str(tmp_path / "in"), known, receipts=str(receipts))
    assert [b.name for b in first.batches] == ["a"]
    for receipt in receipts.glob("*.json"):
        kept = json.loads(receipt.read_text())
        receipt.write_text(json.dumps({**kept, **forged}))
    again = screen_incoming(store, str(tmp_path / "in"), known, receipts=str(receipts))
    assert [b.name for b in again.batches] == ["a"] and [r.name for r in again.refused] == ["b"]
    assert again.batches[0].rows == 4
