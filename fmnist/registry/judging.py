"""Judging a registry's rollout: every replica's evidence windows since it started and what registration
kept of both versions, the rule of `fmnist.registry.judge` applied to them, and the verdict carried out
through the rollout's records (`fmnist.registry.rollout`); with the evidence over time for the report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from fmnist.data.feedback import reviewed_answers
from fmnist.evaluation import estimates
from fmnist.evaluation.evidence import MAX_WINDOW_S, EvidenceTotals, EvidenceWindow, read_windows, sum_windows
from fmnist.evaluation.monitor import periods_of
from fmnist.registry.judge import JudgeParams, LiveEvidence, Offline, Verdict, finite, judge, p99_ms
from fmnist.registry.labels import CANARY, STABLE, Labels
from fmnist.registry.predictions import paired_test_predictions
from fmnist.registry.rollout import RolloutRecord, Rollouts
from fmnist.registry.versions import Registry, RegistryError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Judgement:
    """What the judge did with a registry's rollout: its verdict, and what it could not read."""

    version: str | None  # the canary judged (None: no rollout in progress)
    champion: str | None  # after the judgement (`assess`: the one the canary is held to)
    verdict: Verdict | None
    skipped: list[str] = field(default_factory=list)  # evidence files that could not be read, named
    timeline: list[TimelineRow] = field(default_factory=list)  # the evidence over time, for the report
    decided_meanwhile: str | None = None  # another's decision, made while this judge read the evidence


@dataclass(frozen=True)
class RolloutWindows:
    """Every replica's windows of a rollout's two versions that end after it started (a window is counted
    whole: stable's first may hold a little from before), and the files that could not be read."""

    canary: list[EvidenceWindow]  # served and shadowed
    stable: list[EvidenceWindow]  # served as stable
    skipped: list[str]
    left_out: int  # windows in range beyond the MAX_WINDOWS read of either version


def rollout_windows(registry: Registry, canary: str, champion: str, since: float, now: float) -> RolloutWindows:
    canary_read = read_windows(registry.store, registry.root, canary, since - MAX_WINDOW_S, now)
    stable_read = read_windows(registry.store, registry.root, champion, since - MAX_WINDOW_S, now)
    return RolloutWindows(
        [w for w in canary_read.windows if w.end > since],
        [w for w in stable_read.windows if w.end > since and w.source == "served" and w.label == STABLE],
        [*canary_read.skipped, *stable_read.skipped],
        canary_read.left_out + stable_read.left_out,
    )


def live_evidence(windows: RolloutWindows, champion: str, elapsed_s: float) -> LiveEvidence:
    canary = sum_windows(windows.canary)
    pairs = canary.pairs.get(champion)
    pairs = np.asarray(pairs) if pairs else None
    return LiveEvidence(canary, sum_windows(windows.stable), pairs, elapsed_s, left_out=windows.left_out)


def offline_evidence(registry: Registry, canary: str, champion: str) -> Offline:
    paired = paired_test_predictions(registry, champion, canary)
    stable_predictions, canary_predictions = paired if paired else (None, None)
    return Offline(
        registry.manifest(canary).calibration,
        registry.manifest(champion).calibration,
        canary_predictions,
        stable_predictions,
    )


def assess(
    registry: Registry, rollout: RolloutRecord, params: JudgeParams, now: float, feedback: str | None = None
) -> Judgement:
    """The rule applied to `rollout`'s evidence now, acting on nothing (what `rollout status` shows).
    `feedback`: the feedback loop's folder, whose reviewed answers are the truth where there are any."""
    champion = rollout.champion or registry.champion()
    since = datetime.fromisoformat(rollout.started_at).timestamp()
    windows = rollout_windows(registry, rollout.version, champion, since, now)
    offline = offline_evidence(registry, rollout.version, champion)
    evidence = live_evidence(windows, champion, now - since)
    skipped = list(windows.skipped)
    if feedback:
        reviewed = reviewed_answers(registry.store, feedback, {rollout.version, champion})
        skipped += reviewed.unreadable

        def right_of(version: str) -> tuple[int, int]:
            answers = [a.correct for a in reviewed.answers if a.version == version and since <= a.at <= now]
            return sum(answers), len(answers)

        evidence = replace(
            evidence,
            reviewed_canary=right_of(rollout.version),
            reviewed_stable=right_of(champion),
            left_out=evidence.left_out + reviewed.left_out,  # the truth in part: no promotion on it
        )
    verdict = judge(evidence, offline, params)
    return Judgement(rollout.version, champion, verdict, skipped, timeline(windows, offline, champion))


def judge_rollout(
    registry: Registry, params: JudgeParams, now: float | None = None, feedback: str | None = None
) -> Judgement:
    """Judge the rollout in progress, if any (`assess`), and act on the verdict: promote the canary (the
    champion pointer's compare-and-swap and its audit log, with the evidence summary) or roll it back."""
    rollouts = Rollouts(registry)
    now = time.time() if now is None else now
    if (held_back := _unfinished_promotion(rollouts, params, now, feedback)) is not None:
        return held_back
    rollouts.finish_decided()  # a decision a crash left half done is finished before anything is judged
    rollout = rollouts.active()
    if rollout is None:
        return Judgement(None, registry.champion(), None)
    if (moved := _champion_moved(rollouts, rollout)) is not None:
        return Judgement(rollout.version, registry.champion(), None, decided_meanwhile=moved)
    judgement = assess(registry, rollout, params, now, feedback)
    verdict = judgement.verdict
    act = {"promote": rollouts.promote, "roll_back": rollouts.roll_back}.get(verdict.action)
    if act and (moved := _champion_moved(rollouts, rollout)) is not None:  # by hand while the evidence was read
        return replace(judgement, champion=registry.champion(), decided_meanwhile=moved)
    try:
        if act:
            act(rollout.version, f"live evidence: {verdict.reason}", verdict.summary())
    except RegistryError:
        decided = rollouts.record(rollout.version)
        if decided is None or decided.outcome is None:
            raise
        # An operator (or another judge) decided it while the evidence was read: theirs stands, and is no failure.
        return replace(judgement, champion=registry.champion(), decided_meanwhile=decided.outcome)
    return replace(judgement, champion=registry.champion())


def _unfinished_promotion(
    rollouts: Rollouts, params: JudgeParams, now: float, feedback: str | None
) -> Judgement | None:
    """A promotion decided and not carried out (its decider stopped) is carried out only if the evidence says
    so now: its file alone vouches for nothing (a forged one would promote). Otherwise the canary is no longer
    served and the judgement says why; `rollout status` shows it, and `fashion-mnist promote` makes it by hand.
    None: no such promotion, or one the evidence holds (finish_decided carries it out)."""
    unfinished = rollouts.unfinished()
    if unfinished is None or unfinished.outcome != "promoted":
        return None
    judgement = assess(rollouts.registry, unfinished, params, now, feedback)
    if judgement.verdict.action == "promote":
        return None
    Labels(rollouts.registry).release(CANARY, unfinished.version)
    log.warning(
        "%s's promotion was decided and never carried out, and the evidence now says %s (%s): not carried out",
        unfinished.version,
        judgement.verdict.action.replace("_", " "),
        judgement.verdict.reason,
    )
    return replace(judgement, champion=rollouts.registry.champion(), decided_meanwhile="promoted, not carried out")


def _champion_moved(rollouts: Rollouts, rollout: RolloutRecord) -> str | None:
    """End a rollout whose champion moved under it (by hand, or a rollback) and say how; None if it did not.
    The canary was gated, and its agreement is judged, against the champion it started beside: made champion
    by hand, its rollout is promoted; otherwise it is superseded, never promoted over the operator's choice."""
    champion = rollouts.registry.champion()
    if champion == rollout.champion:
        return None
    by_hand = {"decided_by": "operator", "champion": champion}
    if champion == rollout.version:
        rollouts.promote(rollout.version, "made champion by hand during its rollout", by_hand)
        return "promoted"
    reason = (
        f"the champion moved from {rollout.champion} to {champion} during the rollout (by hand, or a rollback): "
        f"{rollout.version} was gated against {rollout.champion}; `fashion-mnist label canary {rollout.version}` "
        "serves it again beside the new champion, or a retrain gates a new version"
    )
    rollouts.supersede(rollout.version, reason, by_hand)
    return "superseded"


TIMELINE_ROWS = 24  # periods the report shows: the rollout's time so far in this many, each a window or more


@dataclass(frozen=True)
class TimelineRow:
    """One period of a rollout: what each check's figure was over it alone."""

    start: float
    canary_images: int
    agreement: float | None  # on the period's shadowed requests
    canary_accuracy: float | None  # estimated under the live class mix
    stable_accuracy: float | None
    canary_p99_ms: float | None


def timeline(windows: RolloutWindows, offline: Offline, champion: str) -> list[TimelineRow]:
    """The rollout's evidence over time, period by period, for the report (the verdict reads the sums)."""
    if not windows.canary:
        return []
    first = min(w.start for w in windows.canary)
    span = max(w.end for w in windows.canary) - first
    period_s = max(span / TIMELINE_ROWS, max(w.end - w.start for w in windows.canary), 1.0)
    stable_by_period = dict(periods_of(windows.stable, period_s))
    rows = []
    for start, canary in periods_of(windows.canary, period_s):
        stable = stable_by_period.get(start)
        pairs = canary.pairs.get(champion)
        agreement = np.trace(pairs) / np.sum(pairs) if pairs and np.sum(pairs) else None
        rows.append(
            TimelineRow(
                start,
                canary.images,
                None if agreement is None else float(agreement),
                _estimate(canary, offline.canary_calibration),
                _estimate(stable, offline.stable_calibration),
                finite(p99_ms(canary.latency_ms)) if canary.requests else None,
            )
        )
    return rows


def _estimate(totals: EvidenceTotals | None, calibration: estimates.Calibration | None) -> float | None:
    if totals is None or calibration is None or not totals.images:
        return None
    return estimates.mix_weighted_accuracy(totals.predicted, calibration)
