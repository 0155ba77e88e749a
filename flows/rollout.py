"""After the gate: the rollout judge (a canary earns the champion's traffic on live evidence, or is rolled
back) and the champion's watch, each a flow that its deployment runs every few minutes."""

from __future__ import annotations

from prefect import flow

from fmnist.evaluation.monitor import MonitorParams
from fmnist.registry.judge import JudgeParams
from fmnist.storage.layout import StorageParams
from tasks.rollout import RolloutOutcome, WatchOutcome, judge_rollout_task, watch_champion_task


@flow(name="judge-rollout")
def judge_rollout(judge: JudgeParams = JudgeParams(), storage: StorageParams = StorageParams()) -> RolloutOutcome:
    """`judge`: the rule's thresholds; `storage`: the registry whose canary is judged (and its evidence)."""
    return judge_rollout_task(storage=storage, params=judge)


@flow(name="watch-champion")
def watch_champion(watch: MonitorParams = MonitorParams(), storage: StorageParams = StorageParams()) -> WatchOutcome:
    """`watch`: the periods and thresholds; `storage`: the registry whose champion is watched."""
    return watch_champion_task(storage=storage, params=watch)
