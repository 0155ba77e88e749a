"""The storage module's guarantees, on local disk and on a real S3 server (SeaweedFS), with the same tests."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fmnist.storage import (
    IntegrityError,
    NotAFile,
    PreconditionFailed,
    StorageError,
    Store,
    StoredFile,
    UnsafeName,
    inside,
    join,
    normalize,
)
from fmnist.storage.base import Backend
from fmnist.storage.local import LocalBackend
from fmnist.storage.s3 import S3Backend
from fmnist.storage.store import BACKENDS
from tests.conftest import BACKEND_ROOTS
from tests.helpers import unix_socket
from tests.processes import forked_processes
from tests.s3_proxy import lossy_proxy
from tests.seaweedfs import SECRET_KEY, S3Server


def test_round_trip_listing_and_delete(store: Store, root: str) -> None:
    store.write_bytes(join(root, "a", "one.txt"), b"1")
    store.write_json(join(root, "a", "b", "two.json"), {"n": 2})
    assert store.read_bytes(join(root, "a", "one.txt")) == b"1"
    assert store.read_json(join(root, "a", "b", "two.json")) == {"n": 2}
    assert store.listdir(join(root, "a")) == ["b", "one.txt"]
    assert store.find(root) == ["a/b/two.json", "a/one.txt"]
    assert store.listdir(join(root, "nothing-here")) == []
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: not found"):
        store.read_bytes(join(root, "missing.txt"))
    store.delete(join(root, "a"))
    assert store.find(root) == [] and not store.exists(join(root, "a", "one.txt"))
    store.delete(join(root, "a"))  # nothing there: no error


def test_a_fingerprint_changes_whenever_content_changes(store: Store, root: str) -> None:
    folder = join(root, "batch")
    assert store.fingerprint(folder) is None
    store.write_bytes(join(folder, "a.bin"), b"one")
    store.write_bytes(join(folder, "sub", "b.bin"), b"two")
    first = store.fingerprint(folder)
    assert first and store.fingerprint(folder) == first  # a listing: the same while nothing is written
    store.write_bytes(join(folder, "sub", "b.bin"), b"TWO")  # same size, other content
    changed = store.fingerprint(folder)
    store.write_bytes(join(folder, "c.bin"), b"")  # a file added
    added = store.fingerprint(folder)
    store.delete(join(folder, "c.bin"))  # and removed
    removed = store.fingerprint(folder)
    assert len({first, changed, added}) == 3 and removed != added
    one = store.fingerprint(join(folder, "a.bin"))  # of one file, too
    assert one and one != store.fingerprint(folder)


def test_a_stamp_changes_when_content_is_rewritten_with_its_times_kept(store: Store, root: str) -> None:
    """`cp --preserve=timestamps` onto the old file, `rsync -t --inplace`, `touch -d`: the size, the
    modification time and the inode stay, the content does not; the stamp must change. On disk the
    inode change time does, which no user can set; in a bucket every write makes a new ETag."""
    target = join(root, "batch", "labels")
    store.write_bytes(target, b"trouser")
    first = store.fingerprint(join(root, "batch"))
    settled = store.stamp(join(root, "batch")).settled
    if (path := store.direct_path(target)) is not None:
        before = os.stat(path)
        time.sleep(0.02)  # past the kernel's clock tick
        with open(path, "r+b") as f:
            f.write(b"bag....")
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
        assert not settled  # just written: a write in the same clock tick could keep it
    else:
        store.write_bytes(target, b"bag....")
        assert settled  # the ETag is the content's
    assert store.read_bytes(target) == b"bag...."
    assert store.fingerprint(join(root, "batch")) != first


def test_a_bounded_read_stops_past_its_bound(store: Store, root: str) -> None:
    """What the readers of untrusted records use: a file up to the bound whole, past it nothing (None)."""
    content = os.urandom(3 << 20)  # several chunks
    store.write_bytes(f"{root}/big", content)
    assert store.read_at_most(f"{root}/big", len(content)) == content
    assert store.read_at_most(f"{root}/big", len(content) - 1) is None
    with pytest.raises(FileNotFoundError):
        store.read_at_most(f"{root}/none", 10)


def test_create_is_create_only(store: Store, root: str) -> None:
    target = join(root, "claim.json")
    store.create(target, b"first")
    with pytest.raises(PreconditionFailed, match=r"claim\.json: already exists"):
        store.create(target, b"second")
    assert store.read_bytes(target) == b"first"


def test_replace_is_compare_and_swap(store: Store, root: str) -> None:
    target = join(root, "pointer.json")
    assert store.read_versioned(target) is None
    store.replace(target, b"v1", None)
    data, etag = store.read_versioned(target)
    assert data == b"v1"
    store.replace(target, b"v2", etag)
    with pytest.raises(PreconditionFailed, match="changed by another writer"):
        store.replace(target, b"stale", etag)  # written from what was read before v2
    with pytest.raises(PreconditionFailed):
        store.replace(target, b"stale", None)  # "must not exist yet"
    assert store.read_bytes(target) == b"v2"


def _increment(args: tuple[str, str, int, dict, float]) -> int:
    """From `start_at` on, add 1 to a counter file `times` times by compare-and-swap; return how many
    conflicts it met.

    Each write carries the writer's token, as the store asks: equal bytes count as the writer's own.
    """
    root, scratch, times, env, start_at = args
    os.environ.update(env)
    store, target, conflicts, token = Store(scratch=Path(scratch)), join(root, "counter"), 0, os.urandom(8).hex()
    store.read_versioned(target)  # the first request's set-up (a client, a bucket check) before the start
    time.sleep(max(0.0, start_at - time.time()))  # all at once: on a busy host, started apart they never raced
    for _ in range(times):
        while True:
            data, etag = store.read_versioned(target)
            try:
                store.replace(target, f"{int(data.split()[0]) + 1} {token}".encode(), etag)
                break
            except PreconditionFailed:
                conflicts += 1
    return conflicts


def test_compare_and_swap_from_many_processes_loses_no_update(
    store: Store, root: str, tmp_path: Path, s3_server: S3Server
) -> None:
    store.write_bytes(join(root, "counter"), b"0")
    start_at = time.time() + 8  # after the six processes have started (the first use starts their server)
    jobs = [(root, str(tmp_path / "scratch"), 10, s3_server.env(), start_at) for _ in range(6)]
    with forked_processes().Pool(6) as pool:
        conflicts = pool.map(_increment, jobs)
    assert store.read_bytes(join(root, "counter")).split()[0] == b"60"
    assert sum(conflicts) > 0, "the processes never raced: the test proved nothing"


def test_racing_creates_have_exactly_one_winner(store: Store, root: str) -> None:
    target, winners, barrier = join(root, "v0007", "claim.json"), [], threading.Barrier(8)

    def claim(n: int) -> None:
        barrier.wait()
        try:
            store.create(target, f"writer {n}".encode())
            winners.append(n)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and store.read_bytes(target) == f"writer {winners[0]}".encode()


def test_staged_write_is_published_whole_or_not_at_all(store: Store, root: str) -> None:
    target = join(root, "cache", "train.parquet")
    with pytest.raises(RuntimeError, match="disk full"), store.staged(target) as tmp:
        tmp.write_bytes(b"half of it")
        raise RuntimeError("disk full")
    assert not store.exists(target)
    with store.staged(target) as tmp:
        tmp.write_bytes(b"all of it")
    assert store.read_bytes(target) == b"all of it"


def test_local_copy_is_verified_and_reused(store: Store, root: str, tmp_path: Path) -> None:
    data = b"model bytes" * 1000
    target = join(root, "runs", "r1", "model.keras")
    store.write_bytes(target, data)
    stored = StoredFile(target, hashlib.sha256(data).hexdigest())
    copy = store.local_copy(stored)
    assert copy.read_bytes() == data and copy.suffix == ".keras"
    assert (store.direct_path(root) is None) == (copy != Path(target))  # on S3 a scratch copy, on disk the file itself
    assert store.local_copy(stored).stat().st_ino == copy.stat().st_ino  # reused, not fetched again
    with pytest.raises(IntegrityError, match=r"model.keras: sha256 \w+ is not the recorded 0{64}"):
        store.local_copy(StoredFile(target, "0" * 64))
    if store.direct_path(root) is None:
        copy.write_bytes(data[:-1] + b"X")  # a damaged scratch copy is noticed, and fetched again
        assert store.local_copy(stored).read_bytes() == data
    store.write_bytes(target, b"tampered")  # what is stored changed: refused, whatever scratch holds
    with pytest.raises(IntegrityError, match="is not the recorded"):
        store.local_copy(stored)
    store.delete(target)
    with pytest.raises(FileNotFoundError, match=r"model\.keras: not found"):
        store.local_copy(stored)


def test_put_tree_writes_its_marker_last(store: Store, root: str, tmp_path: Path, monkeypatch) -> None:
    local = tmp_path / "result"
    (local / "docs").mkdir(parents=True)
    (local / "docs" / "index.html").write_text("<html/>")
    (local / "report.json").write_text("{}")
    (local / "result.json").write_text("{}")
    real_put, calls = store.put_file, []

    def failing_put(file: Path, location: str) -> None:
        calls.append(file.name)
        if len(calls) == 2:
            raise StorageError(f"{location}: connection lost")
        real_put(file, location)

    monkeypatch.setattr(store, "put_file", failing_put)
    with pytest.raises(StorageError, match="connection lost"):
        store.put_tree(local, join(root, "validation", "k1"), marker="report.json")
    assert not store.exists(join(root, "validation", "k1", "report.json"))
    monkeypatch.setattr(store, "put_file", real_put)
    store.put_tree(local, join(root, "validation", "k1"), marker="report.json")
    assert store.find(join(root, "validation", "k1")) == ["docs/index.html", "report.json", "result.json"]
    with store.local_tree(join(root, "validation", "k1")) as folder:
        assert (folder / "docs" / "index.html").read_text() == "<html/>"


def test_locations_are_normalized_and_credentials_refused(tmp_path: Path) -> None:
    assert normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert normalize("S3://bucket") == "s3://bucket"
    assert normalize(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert normalize(f"file://{tmp_path}/x%3Fy%23z") == str(tmp_path / "x?y#z")
    assert normalize(f"{tmp_path}/x?y#z") == str(tmp_path / "x?y#z")  # a path's characters are literal
    for url in (f"file://{tmp_path}/x?y", f"file://{tmp_path}/x#y", f"file://{tmp_path}/x?", "s3://bucket/x#"):
        with pytest.raises(StorageError, match="takes no query or fragment"):
            normalize(url)
    assert normalize("relative/dir") == str(Path("relative/dir").resolve())
    with pytest.raises(StorageError, match="credentials do not belong in a storage URL") as refused:
        normalize(f"s3://AKIAEXAMPLE:{SECRET_KEY}@bucket/prefix")
    assert SECRET_KEY not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        normalize("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket name"):
        normalize("s3:///x")


def test_missing_bucket_is_named(s3_env: S3Server, store: Store) -> None:
    expected = "s3://no-such-bucket-here/registry/champion.json: bucket 'no-such-bucket-here' does not exist at "
    with pytest.raises(StorageError, match=re.escape(expected + s3_env.endpoint)) as exc:
        store.read_versioned("s3://no-such-bucket-here/registry/champion.json")
    assert SECRET_KEY not in str(exc.value)


def test_wrong_credentials_are_refused_with_a_hint(bucket: str, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=r"access denied by .* check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Store(scratch=tmp_path).write_bytes(join(bucket, "x"), b"1")


def test_stores_share_the_apis_definitions_but_read_their_own_credentials(bucket: str, monkeypatch, tmp_path) -> None:
    """botocore's S3 definitions are loaded once a process (`service_models`): a new store reads no model
    file. Its credentials are still its own, read when it is made: a store made after they changed uses the
    new ones (refused here), and one made before keeps working with its own."""
    import botocore
    from botocore.loaders import JSONFileLoader

    first = Store(scratch=tmp_path / "first")
    first.write_bytes(join(bucket, "x"), b"1")
    loaded, load_file = [], JSONFileLoader.load_file
    monkeypatch.setattr(JSONFileLoader, "load_file", lambda self, path: loaded.append(path) or load_file(self, path))
    assert Store(scratch=tmp_path / "second").read_bytes(join(bucket, "x")) == b"1"
    assert loaded == []
    # A store whose AWS_DATA_PATH names other models reads those (as each store read its own before).
    models = tmp_path / "models" / "s3" / "2006-03-01"
    models.mkdir(parents=True)
    shutil.copy(Path(botocore.__file__).parent / "data" / "s3" / "2006-03-01" / "service-2.json.gz", models)
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path / "models"))
    assert Store(scratch=tmp_path / "models-of-its-own").read_bytes(join(bucket, "x")) == b"1"
    assert any(path.startswith(str(models)) for path in loaded), loaded
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=r"access denied by .* check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        Store(scratch=tmp_path / "third").read_bytes(join(bucket, "x"))
    assert first.read_bytes(join(bucket, "x")) == b"1"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections and never answers: an endpoint that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_unreachable_endpoint_fails_within_its_timeout(s3_env: S3Server, silent_endpoint: str, monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    for endpoint in (f"http://127.0.0.1:{closed_port}", silent_endpoint):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        started = time.monotonic()
        with pytest.raises(StorageError, match=f"s3://fmnist/data: cannot reach the object store at {endpoint}"):
            Store(timeout_s=1).exists("s3://fmnist/data")
        # Three attempts of at most 1 s each, with backoff between them: never a hang.
        assert time.monotonic() - started < 20


def test_no_secret_in_any_error(bucket: str, tmp_path: Path, monkeypatch) -> None:
    store = Store(scratch=tmp_path)
    errors = []
    for action in (
        lambda: store.read_bytes(join(bucket, "missing")),
        lambda: store.create(join(bucket, "x"), b"1") or store.create(join(bucket, "x"), b"2"),
        lambda: store.local_copy(StoredFile(join(bucket, "x"), "0" * 64)),
    ):
        with pytest.raises((StorageError, FileNotFoundError)) as exc:
            action()
        errors.append(repr(exc.value) + str(exc.value.__cause__))
    assert all(SECRET_KEY not in e for e in errors)
    assert json.dumps(errors)  # messages are plain text


def test_scratch_copies_unused_for_two_weeks_are_pruned(store: Store, bucket: str, tmp_path: Path) -> None:
    files = []
    for name in ("old.parquet", "recent.parquet"):
        data = name.encode() * 100
        store.write_bytes(join(bucket, name), data)
        files.append(StoredFile(join(bucket, name), hashlib.sha256(data).hexdigest()))
    old, recent = (store.local_copy(f) for f in files)
    stale_run = tmp_path / "scratch" / "runs" / "run-1"
    stale_run.mkdir(parents=True)
    weeks_ago = time.time() - 15 * 24 * 3600
    for path in (old, stale_run):
        os.utime(path, (weeks_ago, weeks_ago))
    assert store.prune_scratch() == 2
    assert not old.exists() and not stale_run.exists() and recent.exists()
    assert store.local_copy(files[0]).read_bytes() == b"old.parquet" * 100  # fetched again when needed
    assert Store().prune_scratch() == 0  # a store without scratch has nothing to prune


def test_names_are_literal_on_every_backend(store: Store, root: str) -> None:
    """fsspec's copy, move and delete glob on S3: deleting `shoes[1]` deleted `shoes1`, moving `bad*` moved
    `bad-day` and `badges`. Every store operation takes a name as it is."""
    names = ["shoes1", "shoes[1]", "bad-day", "badges", "bad*", "q?", "qx", "a{b,c}", "ab"]
    for name in names:
        store.write_bytes(join(root, "in", name, "f.txt"), name.encode())
    assert store.listdir(join(root, "in")) == sorted(names)
    store.delete(join(root, "in", "shoes[1]"))
    store.move(join(root, "in", "bad*"), join(root, "moved", "bad*"))
    store.delete(join(root, "in", "q?"))
    store.delete(join(root, "in", "a{b,c}"))
    assert store.listdir(join(root, "in")) == ["ab", "bad-day", "badges", "qx", "shoes1"]
    assert store.find(join(root, "moved")) == ["bad*/f.txt"]
    for name in ("ab", "bad-day", "badges", "qx", "shoes1"):
        assert store.read_bytes(join(root, "in", name, "f.txt")) == name.encode()
    assert store.exists(join(root, "moved", "bad*", "f.txt")) and not store.exists(join(root, "in", "q?", "f.txt"))


def test_move_carries_a_file_or_a_folder_whole_and_never_over_anything(store: Store, root: str) -> None:
    store.write_bytes(join(root, "stray.zip"), b"zip")
    store.write_bytes(join(root, "batch", "x", "y.txt"), b"y")
    store.write_bytes(join(root, "batch", "z.txt"), b"z")
    store.move(join(root, "stray.zip"), join(root, "q", "one", "stray.zip"))
    store.move(join(root, "batch"), join(root, "q", "two"))
    assert store.find(join(root, "q")) == ["one/stray.zip", "two/x/y.txt", "two/z.txt"]
    assert store.read_bytes(join(root, "q", "one", "stray.zip")) == b"zip"
    assert store.listdir(root) == ["q"]
    store.write_bytes(join(root, "again.zip"), b"again")
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.move(join(root, "again.zip"), join(root, "q", "two"))
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.move(join(root, "again.zip"), join(root, "q", "one", "stray.zip"))
    assert store.read_bytes(join(root, "again.zip")) == b"again"
    with pytest.raises(FileNotFoundError):
        store.move(join(root, "never-was"), join(root, "q", "three"))


def test_a_fifo_a_device_a_socket_or_a_kernel_file_is_refused_not_waited_on(store: Store, tmp_path: Path) -> None:
    """A FIFO blocks its reader forever: a mirror or a record that is one hung the run with heartbeats flowing.
    A socket failed its opening with "No such device or address", and the kernel's pseudo filesystems' files
    call themselves regular (`/proc/kmsg` blocks its reader; `/proc/self/mem` fails with an I/O error)."""
    fifo = tmp_path / "names-a-fifo.gz"
    os.mkfifo(fifo)
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "mem").symlink_to("/proc/self/mem")
    (tmp_path / "kernel-version").symlink_to("/proc/version")
    (tmp_path / "kernel-setting").symlink_to("/sys/devices/system/cpu/online")
    unix_socket(tmp_path / "socket.json")
    refusals = {
        str(fifo): "a FIFO",
        str(tmp_path / "zero"): "a device or socket",
        str(tmp_path / "socket.json"): "a socket",
        str(tmp_path / "mem"): r"a kernel file \(proc\)",
        str(tmp_path / "kernel-version"): r"a kernel file \(proc\)",
        str(tmp_path / "kernel-setting"): r"a kernel file \(sysfs\)",
    }
    started = time.monotonic()
    for location, kind in refusals.items():
        for read in (store.read_bytes, store.read_versioned, lambda loc: list(store.iter_chunks(loc))):
            with pytest.raises(NotAFile, match=rf"{re.escape(location)}: {kind}, not a regular"):
                read(location)
    assert time.monotonic() - started < 5
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert store.read_bytes(str(tmp_path / "link")) == b"data"  # a link to a regular file is read


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\..\\b", "a\0b", "saved_model/1/.."]
)
def test_a_name_from_a_record_must_stay_inside_its_folder(name: str) -> None:
    with pytest.raises(UnsafeName, match="is not a name inside this folder"):
        inside("s3://bucket/versions/v0001", name)


def test_names_inside_a_folder_are_joined() -> None:
    assert inside("/r/v0001", "saved_model/1/saved_model.pb") == "/r/v0001/saved_model/1/saved_model.pb"
    assert inside("s3://b/v", "a..b/c") == "s3://b/v/a..b/c"


def test_a_lost_answer_to_a_conditional_write_is_known_for_the_writers_own(
    s3_env: S3Server, bucket: str, tmp_path: Path, monkeypatch
) -> None:
    """A create-only PUT that landed but whose answer was lost: its retry got 412 'already exists' for the
    writer's own write, and a compare-and-swap 'changed by another writer'."""
    with lossy_proxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        store = Store(scratch=tmp_path / "scratch", timeout_s=5)
        target = join(bucket, "claim.json")
        proxy.lose_answers = 1
        store.create(target, b"mine")
        proxy.lose_answers = 1
        store.replace(target, b"mine, moved", store.read_versioned(target)[1])
        assert proxy.answers_lost == 2 and store.read_bytes(target) == b"mine, moved"
        # A request lost before it reached the server is simply sent again.
        proxy.lose_requests = 1
        store.create(join(bucket, "second.json"), b"two")
        assert proxy.requests_lost == 1 and store.read_bytes(join(bucket, "second.json")) == b"two"
        # Another writer's bytes are never taken for this writer's, and a lost race stays lost.
        proxy.lose_requests = 1
        with pytest.raises(PreconditionFailed, match="already exists"):
            store.create(target, b"someone else's")
        etag = store.read_versioned(target)[1]
        store.replace(target, b"moved on", etag)
        proxy.lose_answers = 1
        with pytest.raises(PreconditionFailed, match="changed by another writer"):
            store.replace(target, b"from a stale read", etag)
        assert store.read_bytes(target) == b"moved on"


def test_every_backend_implements_the_whole_protocol_and_has_a_test_root() -> None:
    """A backend is one module and one line in BACKENDS; this holds it to every operation of the
    protocol, with the same signatures, and to a root in conftest's BACKEND_ROOTS for the shared tests."""
    operations = {
        name: value for name, value in vars(Backend).items() if not name.startswith("_") or name == "__init__"
    }
    operations = {
        name: value for name, value in operations.items() if callable(value) or isinstance(value, staticmethod)
    }
    assert {"create", "replace", "move", "local_tree", "direct_path"} <= set(operations)
    for backend in set(BACKENDS.values()):
        for name, wanted in operations.items():
            found = getattr(backend, name, None)
            assert found is not None, f"{backend.__name__} has no {name}"
            assert list(inspect.signature(found).parameters) == list(inspect.signature(wanted).parameters), (
                f"{backend.__name__}.{name}{inspect.signature(found)} is not the protocol's {inspect.signature(wanted)}"
            )
    kinds = {"local": LocalBackend, "s3": S3Backend}
    assert set(kinds) == set(BACKEND_ROOTS) and set(kinds.values()) == set(BACKENDS.values())
