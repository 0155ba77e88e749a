"""Run-folder retention: the newest N and the young are kept, so are registered and unfinished runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fmnist.registry.retention import RetentionParams, prune_run_folders
from fmnist.storage import Store, join


def test_keeps_the_newest_the_young_and_the_protected(data_layout, store: Store) -> None:
    runs = join(data_layout.root, "runs")
    for name in ("old-a", "old-b", "registered", "running", "new"):
        store.write_bytes(join(runs, name, "history.json"), b"{}")
        store.write_bytes(join(runs, name, "logs", "train.log"), b"...")
    # Every folder was just written; judged from ten days on, all are old but the newest two are kept.
    later = datetime.now(UTC) + timedelta(days=10)
    kept_by_count = RetentionParams(keep_last=2, keep_days=30)
    assert prune_run_folders(store, runs, kept_by_count, protected=set(), now=later) == [], "all younger than 30 days"

    retention = RetentionParams(keep_last=1, keep_days=5)
    deleted = prune_run_folders(store, runs, retention, protected={"registered", "running"}, now=later)
    survivors = store.listdir(runs)
    assert len(survivors) == 3 and {"registered", "running"} <= set(survivors)
    assert sorted(deleted + survivors) == ["new", "old-a", "old-b", "registered", "running"]
    assert not any(store.find(join(runs, name)) for name in deleted)
    assert prune_run_folders(store, runs, retention, protected={"registered", "running"}, now=later) == []


def test_no_runs_folder_is_nothing_to_prune(tmp_path, store: Store) -> None:
    assert prune_run_folders(store, str(tmp_path / "runs"), RetentionParams(), protected=set()) == []
