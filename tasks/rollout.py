"""Rollout and watch stages, as Prefect tasks: the judge's verdict on the canary and the champion's watch,
each with its report and figures over time as artifacts, and an event for the operator when one decides or
finds something (`fmnist.registry.judging`, `fmnist.registry.champion_watch`)."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fmnist.evaluation.monitor import MonitorParams
from fmnist.ops import events
from fmnist.registry.champion_watch import NothingToWatch, prune_old_evidence, watch_champion
from fmnist.registry.judge import JudgeParams
from fmnist.registry.judging import judge_rollout
from fmnist.registry.rollout_report import judgement_markdown, monitor_markdown, monitor_table, timeline_table
from fmnist.registry.versions import Registry
from fmnist.storage.layout import StorageParams


@dataclass(frozen=True)
class RolloutOutcome:
    canary: str | None  # the version judged (None: no rollout in progress)
    action: str  # promote, roll_back, wait, or none
    reason: str
    champion: str | None


@task(name="judge-rollout")
def judge_rollout_task(storage: StorageParams, params: JudgeParams) -> RolloutOutcome:
    logger = get_run_logger()
    judgement = judge_rollout(Registry.of(storage), params, feedback=storage.data.feedback)
    if judgement.skipped:
        logger.warning("Evidence files skipped (%d): %s", len(judgement.skipped), "; ".join(judgement.skipped[:5]))
    verdict = judgement.verdict
    if judgement.decided_meanwhile:  # by another while it was judged, or the champion moved under it
        message = f"Canary {judgement.version}'s rollout was decided {judgement.decided_meanwhile}" + (
            " by another while judged" if verdict else f": the champion moved to {judgement.champion}"
        )
        logger.info(message)
        return RolloutOutcome(judgement.version, "none", message, judgement.champion)
    if verdict is None:
        logger.info("No rollout in progress in %s (champion: %s)", storage.registry, judgement.champion)
        return RolloutOutcome(None, "none", "no rollout in progress", judgement.champion)
    message = f"Canary {judgement.version}: {verdict.action.replace('_', ' ')} ({verdict.reason})"
    logger.info(message)
    decided = {"promote": events.ROLLOUT_PROMOTED, "roll_back": events.ROLLOUT_ROLLED_BACK}.get(verdict.action)
    if decided:  # before the reports: a report that fails must not keep a decision made from the operator
        events.emit(decided, storage.registry, message, version=judgement.version, champion=judgement.champion)
    create_markdown_artifact(key="rollout-report", markdown=judgement_markdown(judgement))
    if judgement.timeline:
        create_table_artifact(
            key="rollout-evidence", table=timeline_table(judgement), description="The rollout's evidence over time"
        )
    return RolloutOutcome(judgement.version, verdict.action, verdict.reason, judgement.champion)


@dataclass(frozen=True)
class WatchOutcome:
    champion: str | None
    drift: bool
    estimate_low: bool
    latest_estimate: float | None
    pruned: int  # evidence windows older than the retention deleted


@task(name="watch-champion")
def watch_champion_task(storage: StorageParams, params: MonitorParams) -> WatchOutcome:
    logger = get_run_logger()
    registry = Registry.of(storage)
    pruned = prune_old_evidence(registry)
    if pruned.left:
        logger.warning(
            "Left in the evidence folders, no windows (%d): %s",
            len(pruned.left),
            "; ".join(pruned.left[:5]),
        )
    try:
        report = watch_champion(registry, params, feedback=storage.data.feedback)
    except NothingToWatch as exc:
        logger.info("Nothing to watch: %s", exc)
        return WatchOutcome(None, False, False, None, pruned.deleted)
    if report.drift:
        message = (
            f"Champion {report.version}: its traffic drifted from the test set's over the last "
            f"{params.drifted_periods} periods of {params.period_s:g} s"
        )
        logger.warning(message)
        events.emit(events.CHAMPION_DRIFTED, storage.registry, message, version=report.version)
    if report.estimate_low:
        message = (
            f"Champion {report.version}: estimated accuracy {report.latest_estimate:.3f}, more than "
            f"{params.estimate_drop} below its test accuracy {report.test_accuracy:.4f}"
        )
        logger.warning(message)
        events.emit(events.CHAMPION_ESTIMATE_LOW, storage.registry, message, version=report.version)
    # After the events, as the judge does: a report that fails must not keep a finding from the operator
    if report.left_out or report.skipped:  # no drift found in part of the evidence is no finding
        logger.warning(
            "The watch read part of the evidence: %d windows or ledgers left out, %d files skipped (%s)",
            report.left_out,
            len(report.skipped),
            "; ".join(report.skipped[:5]),
        )
    create_markdown_artifact(key="champion-watch", markdown=monitor_markdown(report))
    if report.periods:
        create_table_artifact(
            key="champion-watch-periods", table=monitor_table(report), description="The champion's traffic over time"
        )
    return WatchOutcome(report.version, report.drift, report.estimate_low, report.latest_estimate, pruned.deleted)
