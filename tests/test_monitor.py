"""The champion's monitor over evidence windows: drift said only after periods in a row drift, never on
undrifted traffic, and the estimated accuracy falling when the traffic moves away from the test set."""

from __future__ import annotations

import numpy as np
import pytest

from fmnist.data.dataset import NUM_CLASSES
from fmnist.data.feedback import ReviewedAnswer
from fmnist.evaluation import evidence
from fmnist.evaluation.estimates import fit_calibration
from fmnist.evaluation.evidence import EvidenceWindow
from fmnist.evaluation.monitor import MonitorParams, monitor
from fmnist.registry.champion_watch import watch_champion
from fmnist.registry.rollout_report import monitor_markdown
from fmnist.registry.versions import Registry
from tests.rollout_doubles import Versions, answers, evidence_window, register, totals, traffic, write_windows

PARAMS = MonitorParams(period_s=600, min_images=500, alpha=0.001, drifted_periods=2)
HELD_OUT = np.arange(10_000) % NUM_CLASSES
CALIBRATION = fit_calibration(answers(HELD_OUT, seed=1), HELD_OUT)
TEST_ACCURACY = float((answers(HELD_OUT, seed=1).argmax(axis=1) == HELD_OUT).mean())


def windows(periods: int, images: int, first_seed: int, **shift) -> list[EvidenceWindow]:
    """`periods` periods of the champion's traffic, two windows (two replicas) each."""
    made = []
    for period in range(periods):
        for replica in range(2):
            seed = first_seed + 2 * period + replica
            labels = traffic(images // 2, seed=seed, **{k: v for k, v in shift.items() if k != "accuracy"})
            counts = totals(answers(labels, seed=seed + 1000, accuracy=shift.get("accuracy", 0.9)))
            start = period * PARAMS.period_s + replica
            made.append(evidence_window("v0001", "stable", "served", counts, start, replica=f"{replica:032x}"))
    return made


def test_undrifted_traffic_over_many_periods_raises_nothing() -> None:
    report = monitor("v0001", TEST_ACCURACY, windows(24, 1000, first_seed=100), CALIBRATION, PARAMS)
    assert sum(p.judged for p in report.periods) == 24
    assert not report.drift and not report.estimate_low
    assert sum(p.drifted for p in report.periods) <= 1  # a period alone may, at about alpha; two in a row: no
    assert abs(report.latest_estimate - TEST_ACCURACY) < 0.03


@pytest.mark.parametrize(
    "shift", [{"rich_in": (0, 6), "share": 0.7}, {"accuracy": 0.6}], ids=["class-mix", "harder-images"]
)
def test_drift_is_said_once_periods_in_a_row_drift(shift: dict) -> None:
    before = windows(4, 1000, first_seed=200)
    after = windows(3, 1000, first_seed=300, **shift)
    for window in after:
        window.start += 4 * PARAMS.period_s
        window.end += 4 * PARAMS.period_s
    one = monitor("v0001", TEST_ACCURACY, before + after[:2], CALIBRATION, PARAMS)
    assert one.periods[-1].drifted and not one.drift  # one period of drift is not yet said
    two = monitor("v0001", TEST_ACCURACY, before + after[:4], CALIBRATION, PARAMS)
    assert two.drift, [(p.softmax_p, p.class_mix_p) for p in two.periods]
    if "accuracy" in shift:  # less confident, more often wrong: the estimates fall with it
        assert two.estimate_low and two.latest_estimate < TEST_ACCURACY - PARAMS.estimate_drop


def test_periods_with_too_few_images_are_not_judged() -> None:
    report = monitor("v0001", TEST_ACCURACY, windows(3, 200, first_seed=400, accuracy=0.5), CALIBRATION, PARAMS)
    assert [p.judged for p in report.periods] == [False] * 3 and not report.drift and report.latest_estimate is None


def test_each_period_holds_its_reviewed_accuracy_beside_the_estimates() -> None:
    """An estimate checked against the truth: reviewers labeled a sample of each period's answers."""
    made = windows(3, 1000, first_seed=500)
    rng = np.random.default_rng(7)
    truth = [0.9, 0.9, 0.6]  # the last period's reviewed answers are worse than its estimate says
    reviewed = [
        ReviewedAnswer("v0001", period * PARAMS.period_s + 5 + n, bool(rng.random() < share))
        for period, share in enumerate(truth)
        for n in range(200)
    ]
    report = monitor("v0001", TEST_ACCURACY, made, CALIBRATION, PARAMS, reviewed)
    assert [p.reviewed_images for p in report.periods] == [200, 200, 200]
    for period, share in zip(report.periods, truth, strict=True):
        assert abs(period.reviewed_accuracy - share) < 0.06
    first, _, last = report.periods
    assert abs(first.estimates["CBPE"] - first.reviewed_accuracy) < 0.06  # the estimate holds against the truth
    assert last.estimates["CBPE"] - last.reviewed_accuracy > 0.2  # and the truth shows where it does not
    assert monitor("v0001", TEST_ACCURACY, made, CALIBRATION, PARAMS).periods[0].reviewed_accuracy is None


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"lookback_s": 86400, "period_s": 60}, "at most"),  # 1440 periods judged again every run
        ({"lookback_s": 86400, "period_s": 43200, "drifted_periods": 3}, "drift could never be said"),
    ],
)
def test_a_watch_that_could_never_speak_or_never_finish_is_refused(bad: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        MonitorParams.model_validate(bad)


def test_the_watch_says_when_it_read_part_of_the_evidence(root: str, store, monkeypatch) -> None:
    """More windows than one read takes: "no drift" in the part read is no finding, and the report says so."""
    registry = Registry(store, root + "/registry")
    versions = Versions()
    register(registry, 0.9, versions.offline.stable_calibration, versions.offline.stable_predictions, "immediate")
    for hours_ago in (2.5, 1.5, 0.5):
        labels = traffic(600, seed=int(hours_ago * 10))
        write_windows(registry, "v0001", "stable", "served", totals(answers(labels, 3)), hours_ago * 3600)
    monkeypatch.setattr(evidence, "MAX_WINDOWS", 2)
    watch = MonitorParams(period_s=3600, lookback_s=4 * 3600)
    report = watch_champion(registry, watch)
    assert report.left_out == 1 and not report.drift
    assert "in part of the evidence: 1 left out" in monitor_markdown(report)
