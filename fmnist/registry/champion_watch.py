"""Watching the served champion from the servers' evidence windows (`fmnist.evaluation.monitor`), and the
evidence's retention."""

from __future__ import annotations

import time
from dataclasses import replace

from fmnist.data.feedback import ReviewedAnswers, reviewed_answers
from fmnist.evaluation.evidence import Pruned, prune_evidence, read_windows
from fmnist.evaluation.monitor import MonitorParams, MonitorReport, monitor
from fmnist.registry.labels import STABLE
from fmnist.registry.versions import Registry

EVIDENCE_KEPT_DAYS = 30  # windows older than this are deleted by the watch (a month of history)


class NothingToWatch(Exception):
    """No champion, or one registered before calibrations were kept: nothing to judge its traffic against."""


def watch_champion(
    registry: Registry, params: MonitorParams, now: float | None = None, feedback: str | None = None
) -> MonitorReport:
    """The champion's traffic over `params.lookback_s`, judged period by period (`monitor`), with its answers
    reviewers labeled in the feedback loop's folder `feedback`, if given."""
    now = time.time() if now is None else now
    champion = registry.champion()
    if champion is None:
        raise NothingToWatch(f"no champion in {registry.root} yet")
    manifest = registry.manifest(champion)
    if manifest.calibration is None:
        raise NothingToWatch(f"champion {champion} was registered before calibrations were kept: retrain to watch it")
    read = read_windows(registry.store, registry.root, champion, now - params.lookback_s, now)
    windows = [w for w in read.windows if w.source == "served" and w.label == STABLE]
    reviewed = reviewed_answers(registry.store, feedback, {champion}) if feedback else ReviewedAnswers([], [])
    report = monitor(champion, manifest.metrics.test_accuracy, windows, manifest.calibration, params, reviewed.answers)
    unread = read.left_out + reviewed.left_out
    return replace(report, left_out=unread, skipped=[*read.skipped, *reviewed.unreadable])


def prune_old_evidence(registry: Registry, now: float | None = None) -> Pruned:
    return prune_evidence(registry.store, registry.root, EVIDENCE_KEPT_DAYS * 24 * 3600, now)
