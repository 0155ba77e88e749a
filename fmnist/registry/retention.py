"""Retention of run folders: `<registry>/runs/<flow run id>/` holds each run's logs, history and
model until registration; without pruning the folder grows by one run a night, forever.

A run folder is kept while it is among the newest `keep_last`, or younger than `keep_days` (its
newest file), or protected: the folder of a registered version's run (the champion's among them)
and of every run still in progress.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field

from fmnist.registry.versions import NotRegistered, Registry
from fmnist.storage import Store, join

PAGE = 200  # the most flow runs the Prefect API returns at once


class RetentionParams(BaseModel):
    """How many run folders to keep under <registry>/runs/."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    keep_last: int = Field(20, ge=1, le=100_000, description="Always keep this many of the newest run folders")
    keep_days: float = Field(14, ge=0, le=36_500, description="Always keep run folders changed within this many days")


def registered_runs(registry: Registry) -> set[str]:
    """The flow runs whose folders hold a registered version's history: never pruned."""
    runs = set()
    for version in registry.versions():
        try:
            runs.add(registry.manifest(version).flow_run_id)
        except NotRegistered:  # a folder copied in: protects no run
            continue
    return runs - {None}


def runs_in_progress() -> set[str]:
    """Ids of the flow runs the Prefect server has not seen end (queued, running, paused)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    unfinished = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING]
    query = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished)))
    found: set[str] = set()
    with get_client(sync_client=True) as client:
        while page := client.read_flow_runs(flow_run_filter=query, limit=PAGE, offset=len(found)):
            found |= {str(run.id) for run in page}
            if len(page) < PAGE:
                break
    return found


def prune_runs(registry: Registry, runs_root: str, retention: RetentionParams, keep: set[str]) -> list[str]:
    """`prune_run_folders` in the registry's store, protecting registered versions' runs, unfinished
    runs and `keep`."""
    protected = registered_runs(registry) | runs_in_progress() | keep
    return prune_run_folders(registry.store, runs_root, retention, protected)


def prune_run_folders(
    store: Store,
    runs_root: str,
    retention: RetentionParams,
    protected: set[str],
    now: datetime | None = None,
) -> list[str]:
    """Delete the run folders `retention` does not keep and `protected` does not name; their names."""
    changed = {name: store.last_modified(join(runs_root, name)) for name in store.listdir(runs_root)}
    epoch = datetime.fromtimestamp(0, UTC)
    newest_first = sorted(changed, key=lambda name: changed[name] or epoch, reverse=True)
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention.keep_days)
    deleted = []
    for name in newest_first[retention.keep_last :]:
        if name in protected or (changed[name] or epoch) > cutoff:
            continue
        store.delete(join(runs_root, name))
        deleted.append(name)
    return deleted
