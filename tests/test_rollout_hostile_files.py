"""Issue 36's records and files against what a broken or hostile host leaves where they are kept: a FIFO, a
device, a link or a folder where a file should be, a file where a folder should be, a name that is not UTF-8,
a ledger copied under another name, a record that claims the impossible or is far too big, a promotion decided
and never carried out. The judge, the watch and `rollout status` never hang or crash on them: evidence and
ledgers are skipped and named; a rollout record is refused naming the file and the way out. On disk, and in a
bucket of a real S3 server wherever a bucket can hold the case (it has no links, FIFOs or devices)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from fmnist.data import feedback as feedback_module
from fmnist.data.feedback import (
    MAX_LEDGER_BYTES,
    MAX_REVIEW,
    ReviewedBatch,
    ReviewedRecord,
    feedback_lineage,
    ledger_location,
    reviewed_answers,
)
from fmnist.evaluation.evidence import EvidenceWindow, evidence_root, prune_evidence, read_windows, window_location
from fmnist.ops import cli, events
from fmnist.registry.labels import CANARY, Labels
from fmnist.registry.rollout import MAX_RECORD_BYTES, Rollouts
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import Store, join
from tests.helpers import unix_socket
from tests.rollout_doubles import write_ledger
from tests.test_rollout_records import canary_label, crash, register

NOW = time.time()
OLD = 1_700_000_000.0  # a window's start long before any cutoff a test prunes with


def window(version: str = "v0001", start: float = NOW - 60) -> EvidenceWindow:
    return EvidenceWindow(
        replica="ab" * 16, version=version, label="stable", source="served", start=start, end=start + 60
    )


def put(store: Store, registry_root: str, written: EvidenceWindow) -> str:
    location = window_location(registry_root, written)
    store.create(location, written.model_dump_json().encode())
    return location


@pytest.fixture
def rollout(root: str, store: Store) -> Rollouts:
    """A registry with champion v0001 and canary v0002 in rollout."""
    registry = Registry(store, root + "/registry")
    assert register(registry, 0.85).outcome == "promoted"
    assert register(registry, 0.86).outcome == "canary"
    return Rollouts(registry)


# What a broken host leaves where a file should be; each makes it at a path and says what it is.
NO_FILES: dict[str, Callable[[Path], None]] = {
    "a FIFO": os.mkfifo,
    "a link to /dev/zero": lambda path: path.symlink_to("/dev/zero"),
    "a folder": lambda path: (path / "inside").mkdir(parents=True),
    "a socket": unix_socket,
    "a link to a kernel file": lambda path: path.symlink_to("/proc/self/mem"),
    "a link loop": lambda path: path.symlink_to(path),
}


@pytest.mark.parametrize("kind", NO_FILES)
def test_evidence_and_ledgers_that_are_no_files_are_skipped_and_named(tmp_path: Path, kind: str) -> None:
    store, registry_root, feedback = Store(), str(tmp_path / "registry"), str(tmp_path / "feedback")
    kept = window(start=NOW - 120)
    put(store, registry_root, kept)
    hostile = Path(window_location(registry_root, window(start=OLD)))
    NO_FILES[kind](hostile)
    read = read_windows(store, registry_root, "v0001", 0)  # the judge's and the watch's read
    assert read.windows == [kept] and [line.split(": ")[0] for line in read.skipped] == [str(hostile)]

    pruned = prune_evidence(store, registry_root, older_than_s=3600, now=NOW)
    assert pruned.deleted == 0 and pruned.left == [f"{hostile}: not a regular file"]
    assert os.path.lexists(hostile) and os.path.exists("/dev/zero")  # never deleted, nor what a link leads to

    write_ledger(store, feedback, "review-1", [("v0001", 4, 4, NOW)])
    NO_FILES[kind](Path(ledger_location(feedback, "review-9")))
    reviewed = reviewed_answers(store, feedback, {"v0001"})
    assert len(reviewed.answers) == 1
    assert [line.split(": ")[0] for line in reviewed.unreadable] == [ledger_location(feedback, "review-9")]
    lineage = feedback_lineage(store, feedback, {"review-1": "a batch's sha256", "review-9": "another's"})
    assert lineage.unreadable_ledgers == ["review-9"]  # named
    assert lineage.reviewed_batches == ["review-1"]  # and the others still read


def test_prune_never_follows_a_link_out_of_the_evidence_folders(tmp_path: Path) -> None:
    store, registry_root = Store(), str(tmp_path / "registry")
    elsewhere = tmp_path / "operators-folder"  # what a link in evidence/ may lead to: never pruned
    elsewhere.mkdir()
    (elsewhere / window(start=OLD).file_name()).write_text("{}")
    (elsewhere / "notes.txt").write_text("keep me")
    put(store, registry_root, window(start=OLD))
    root = Path(evidence_root(registry_root))
    (root / "v0009").symlink_to(elsewhere)
    (root / "v0001" / window(start=OLD + 1).file_name()).symlink_to(elsewhere / "notes.txt")

    pruned = prune_evidence(store, registry_root, older_than_s=3600, now=NOW)
    assert pruned.deleted == 1  # the one window
    assert sorted(pruned.left) == [
        f"{root / 'v0001' / window(start=OLD + 1).file_name()}: not a regular file",
        f"{root / 'v0009'}: not a version's folder of windows",
    ]
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted([window(start=OLD).file_name(), "notes.txt"])


def test_prune_deletes_only_windows_in_version_folders(root: str, store: Store) -> None:
    registry_root = root + "/registry"
    old = put(store, registry_root, window(start=OLD))
    young = put(store, registry_root, window(start=NOW))
    name = window(start=OLD).file_name()
    evidence = evidence_root(registry_root)
    kept = [join(evidence, "v0001", "notes.txt"), join(evidence, "latest", name), join(evidence, "v0002", name, "x")]
    for location in kept:
        store.create(location, b"{}")
    pruned = prune_evidence(store, registry_root, older_than_s=3600, now=NOW)
    assert pruned.deleted == 1 and not store.exists(old) and store.exists(young)
    assert all(store.exists(location) for location in kept)
    assert sorted(pruned.left) == [
        f"{join(evidence, 'latest')}: not a version's folder of windows",
        f"{join(evidence, 'v0001', 'notes.txt')}: not a window's name",
        f"{join(evidence, 'v0002', name)}: not a regular file",
    ]


def test_names_that_are_not_utf8_are_escaped_for_logs_and_events(tmp_path: Path, monkeypatch) -> None:
    store, registry_root, feedback = Store(), str(tmp_path / "registry"), str(tmp_path / "feedback")
    put(store, registry_root, window())
    for folder in (join(evidence_root(registry_root), "v0001"), join(feedback, "reviewed")):
        os.makedirs(folder, exist_ok=True)
        Path(folder, os.fsdecode(b"\xff.json")).write_bytes(b"{}")  # a name that is not UTF-8, as listed
    named = [
        *read_windows(store, registry_root, "v0001", 0).skipped,
        *reviewed_answers(store, feedback, {"v0001"}).unreadable,
        *prune_evidence(store, registry_root, older_than_s=1, now=NOW).left,
    ]
    assert len(named) == 3 and all("\\udcff.json" in line for line in named)
    assert json.dumps(named).encode("utf-8")  # what Prefect's logs, artifacts and events encode

    sent = []  # each event as Prefect's client sends it: a real Event, encoded as JSON

    def emit_event(**fields) -> None:
        from prefect.events import Event

        sent.append(Event(**{k: v for k, v in fields.items() if v is not None}).model_dump_json())

    monkeypatch.setattr("prefect.events.emit_event", emit_event)
    events.emit(events.ROLLOUT_PROMOTED, registry_root, named[0], skipped=named[:1], version="v0001")
    assert len(sent) == 1 and "\\\\udcff.json" in sent[0]


ROLLOUT_NO_FILES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "decided.json is a FIFO": ("v0002/decided.json", os.mkfifo),
    "started.json links to /dev/zero": (
        "v0002/started.json",
        lambda path: (path.unlink(), path.symlink_to("/dev/zero")),
    ),
    "a file where a rollout's folder is": ("v0099/started.json", lambda path: path.parent.write_text("x")),
    "decided.json is a socket": ("v0002/decided.json", unix_socket),
    "decided.json links to a kernel file": ("v0002/decided.json", lambda path: path.symlink_to("/proc/self/mem")),
}


@pytest.mark.parametrize("case", ROLLOUT_NO_FILES)
def test_rollout_records_that_are_no_files_are_refused_naming_them(tmp_path: Path, case: str, capsys) -> None:
    registry = Registry(Store(), str(tmp_path / "registry"))
    register(registry, 0.85)
    register(registry, 0.86)
    rollouts = Rollouts(registry)
    where, make = ROLLOUT_NO_FILES[case]
    location = Path(rollouts.root) / where
    make(location)
    with pytest.raises(RegistryError) as refused:
        rollouts.status()
    assert str(refused.value).startswith(f"{location}: a damaged rollout record") and "move it aside" in str(
        refused.value
    )
    assert cli.main(["--registry", registry.root, "rollout", "status"]) == 1
    assert f"{location}: a damaged rollout record" in capsys.readouterr().err  # said, no traceback


def test_a_record_over_the_bound_is_refused_unread(rollout: Rollouts) -> None:
    location = join(rollout.root, "v0002", "decided.json")
    rollout.registry.store.create(location, b" " * MAX_RECORD_BYTES + json.dumps({"version": "v0002"}).encode())
    with pytest.raises(RegistryError, match=f"{location}: a damaged rollout record .over {MAX_RECORD_BYTES:,} bytes"):
        rollout.record("v0002")


def test_a_record_swapped_in_as_its_bounded_read_misses_it_is_never_read_whole(rollout: Rollouts, monkeypatch) -> None:
    """A decision that vanished under the bounded read and came back big (a swap, or a hostile writer): the
    miss is taken as no decision, and the newcomer is not read (it once was, whole, by the registry's
    unbounded reader: a big enough one was a MemoryError)."""
    store, location = rollout.registry.store, join(rollout.root, "v0002", "decided.json")
    read_at_most, unbounded = store.read_at_most, []

    def swapped_in_as_it_misses(where: str, max_bytes: int) -> bytes | None:
        if where != location:
            return read_at_most(where, max_bytes)
        store.create(where, b" " * (4 * MAX_RECORD_BYTES))
        raise FileNotFoundError(where)

    monkeypatch.setattr(store, "read_at_most", swapped_in_as_it_misses)
    monkeypatch.setattr(store, "read_versioned", lambda where: unbounded.append(where))
    monkeypatch.setattr(store, "read_bytes", lambda where: unbounded.append(where))
    record = rollout.record("v0002")
    assert record is not None and record.outcome is None  # in rollout, undecided
    assert unbounded == []


def edit_started(rollout: Rollouts, **changes) -> str:
    location = join(rollout.root, "v0002", "started.json")
    record = json.loads(rollout.registry.store.read_bytes(location))
    rollout.registry.store.write_bytes(location, json.dumps(record | changes).encode())
    return location


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"at": "2999-01-01T00:00:00+00:00"}, "it started at 2999-01-01T00:00:00+00:00, in the future"),
        ({"at": datetime.now().isoformat()}, "at has no time zone"),
        ({"champion": "v0002"}, "its champion is the canary itself"),
    ],
)
def test_started_records_that_claim_the_impossible_are_refused(rollout: Rollouts, changes: dict, problem: str) -> None:
    location = edit_started(rollout, **changes)
    with pytest.raises(RegistryError) as refused:
        rollout.active()  # what the judge judges
    message = str(refused.value)
    assert message.startswith(f"{location}: a damaged rollout record ({problem})") and "move it aside" in message


def test_a_rollout_gated_against_no_version_of_the_registry_is_not_judged(rollout: Rollouts) -> None:
    location = edit_started(rollout, champion="v0042")
    with pytest.raises(RegistryError) as refused:
        rollout.active()
    message = str(refused.value)
    assert message.startswith(f"{location}: the rollout was gated against champion v0042, which is no version")
    assert "label canary --clear" in message
    assert rollout.record("v0002").champion == "v0042"  # the history still reads


def test_a_start_record_of_a_version_that_failed_the_gate_is_no_rollout(rollout: Rollouts) -> None:
    registry = rollout.registry
    rollout.roll_back("v0002", "worse on live traffic", {})
    assert register(registry, 0.50).outcome != "canary"  # v0003 fails the gate
    Labels(registry).set(CANARY, "v0003", "an operator looks at it by hand")
    assert rollout.active() is None  # a canary labeled by hand is no rollout...
    started = json.loads(registry.store.read_bytes(join(rollout.root, "v0002", "started.json")))
    location = join(rollout.root, "v0003", "started.json")  # ...and a start record copied for it makes none
    registry.store.create(location, json.dumps(started | {"version": "v0003"}).encode())
    with pytest.raises(RegistryError) as refused:
        rollout.active()
    message = str(refused.value)
    assert message.startswith(f"{location}: a rollout of v0003, which did not pass the gate (")
    assert "Move the record aside" in message and "label canary --clear" in message


def test_a_rollout_that_started_before_its_version_was_registered_is_no_rollout(rollout: Rollouts) -> None:
    registered = datetime.fromisoformat(rollout.registry.manifest("v0002").registered_at)
    early = (registered - timedelta(days=30)).isoformat()  # the judge would decide it at once, at max_duration_s
    location = edit_started(rollout, at=early)
    with pytest.raises(RegistryError) as refused:
        rollout.active()
    assert str(refused.value).startswith(f"{location}: it started at {early}, before v0002 was registered")


def test_a_decision_planted_before_its_rollout_neither_blocks_nor_decides_it(rollout: Rollouts) -> None:
    registry = rollout.registry
    location = join(rollout.root, "v0003", "decided.json")  # for the next version, before it is registered
    planted = {"version": "v0003", "outcome": "rolled_back", "at": "2026-12-06T23:00:00+00:00", "reason": "planted",
               "evidence": {}, "champion_sequence": registry.champion_record()["sequence"]}  # fmt: skip
    registry.store.create(location, json.dumps(planted).encode())
    assert register(registry, 0.87).outcome == "canary"  # passed the gate: its rollout starts
    assert rollout.active().version == "v0003" and rollout.record("v0003").outcome is None
    assert rollout.ended_without_promotion("v0003") is None and "v0003" not in rollout.rolled_back()
    with pytest.raises(RegistryError) as refused:  # deciding it: the file there is refused, not taken as the decision
        rollout.roll_back("v0003", "worse on live traffic", {})
    message = str(refused.value)
    assert message.startswith(f"{location}: no decision of the rollout") and "move it aside" in message
    assert rollout.active().version == "v0003"
    assert register(registry, 0.88).outcome == "canary"  # nor keeps the next one from superseding it
    assert rollout.active().version == "v0004" and rollout.record("v0003").outcome is None
    assert rollout.roll_back("v0004", "worse on live traffic", {}).outcome == "rolled_back"
    assert rollout.ended_without_promotion("v0004").startswith("rolled back in its canary")


def test_a_review_counts_once_and_a_ledger_is_the_batch_its_name_says(root: str, store: Store) -> None:
    feedback = root + "/feedback"
    answers = [("v0001", 4, 4, NOW)] * 3 + [("v0001", 3, 4, NOW)]
    write_ledger(store, feedback, "review-1", answers)
    write_ledger(store, feedback, "review-2", answers)  # the same records submitted again (the same ids)
    copy = ledger_location(feedback, "review-1-copy")  # a backup beside it
    store.create(copy, store.read_bytes(ledger_location(feedback, "review-1")))
    reviewed = reviewed_answers(store, feedback, {"v0001"})
    assert sorted(a.correct for a in reviewed.answers) == [False, True, True, True]
    assert reviewed.unreadable == [f"{copy}: the ledger of batch 'review-1', not of its name"]


def test_a_record_repeated_in_one_ledger_counts_once(root: str, store: Store) -> None:
    feedback = root + "/feedback"
    write_ledger(store, feedback, "review-1", [("v0001", 3, 4, NOW)] * 40)
    location = ledger_location(feedback, "review-1")
    ledger = json.loads(store.read_bytes(location))
    for record in ledger["records"]:
        record["id"] = "0" * 32  # one record, forty times
    store.write_bytes(location, json.dumps(ledger).encode())
    assert len(reviewed_answers(store, feedback, {"v0001"}).answers) == 1


def test_the_newest_ledgers_are_chosen_by_review_time_the_rest_counted(root: str, store: Store, monkeypatch) -> None:
    monkeypatch.setattr(feedback_module, "MAX_REVIEWED_LEDGERS", 2)
    feedback = root + "/feedback"
    write_ledger(store, feedback, "feedback-20261206", [("v0001", 3, 4, NOW)])  # the real review, today
    for n in range(3):  # empty ledgers reviewed long ago, whose names sort after it
        batch = f"zz-{n}"
        store.create(
            ledger_location(feedback, batch),
            json.dumps({"batch": batch, "at": "2026-01-01T00:00:00+00:00", "submitted": 0, "relabeled": 0,
                        "deleted": 0, "served_versions": {}, "records": []}).encode(),
        )  # fmt: skip
    reviewed = reviewed_answers(store, feedback, {"v0001"})
    assert [a.correct for a in reviewed.answers] == [False] and reviewed.left_out == 2 and reviewed.unreadable == []


def test_a_ledger_bigger_than_a_review_is_named_not_read_whole(root: str, store: Store) -> None:
    feedback = root + "/feedback"
    # What a full review writes fits: MAX_REVIEW records with long file names and sources.
    rows = {"rank": 1, "file": "f" * 200 + ".png", "confidence": "0.1234", "label": "stable", "source": "s" * 200}
    full = ReviewedBatch(
        batch="full", at="2026-12-06T00:00:00+00:00", submitted=MAX_REVIEW, relabeled=0, deleted=0,
        served_versions={"v0001": MAX_REVIEW},
        records=[ReviewedRecord(id=f"{n:032x}", version="v0001", labeled="coat", predicted="coat",
                                at="2026-12-06T00:00:00+00:00", **rows) for n in range(MAX_REVIEW)],
    )  # fmt: skip
    store.create(ledger_location(feedback, "full"), full.model_dump_json(indent=1).encode())
    big = ledger_location(feedback, "big")
    store.create(big, b" " * (MAX_LEDGER_BYTES + 1))
    reviewed = reviewed_answers(store, feedback, {"v0001"})
    assert len(reviewed.answers) == MAX_REVIEW
    assert reviewed.unreadable == [f"{big}: over {MAX_LEDGER_BYTES:,} bytes, more than a review holds"]


def test_a_promotion_decided_and_not_carried_out_is_never_lost_nor_made_by_a_registration(
    rollout: Rollouts, monkeypatch, capsys
) -> None:
    """Only the judge carries such a promotion out, if the evidence still says so (tests/test_judge.py): a
    decision's file alone vouches for nothing, and a registration must not make a forged one champion."""
    registry = rollout.registry
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(registry, "promote", crash)
        rollout.promote("v0002", "every check passed", {})
    base = ["--registry", registry.root, "rollout", "status"]
    assert cli.main(base) == 0
    assert "promoted (not carried out: the judge's next run finishes it)" in capsys.readouterr().out
    assert register(registry, 0.87).outcome == "canary"  # the next nightly, before the judge ran again
    assert registry.champion() == "v0001" and rollout.record("v0002").outcome == "promoted"
    assert canary_label(registry) == "v0003" and rollout.active().champion == "v0001"
    assert cli.main(base) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("v000")}
    assert "promoted (not carried out: never champion; `fashion-mnist promote v0002` makes it)" in rows["v0002"]
