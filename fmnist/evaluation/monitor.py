"""Watching the champion: drift and estimated accuracy over time, from the servers' evidence windows.

Windows are grouped into periods of `period_s`; each period with at least `min_images` images is judged
against the champion's held-out reference (kept in its calibration at registration):
- input drift, black-box: each class's softmax probability and the predicted-class mix, two-sample tests
  with the ten dimensions' Bonferroni correction (`estimates.softmax_shift`, `estimates.class_mix_shift`);
- accuracy estimated three ways (the live class mix, ATC, CBPE), beside the accuracy of the period's
  answers that reviewers labeled, where there are any: the estimates checked against the truth.
Drift is raised only when `drifted_periods` periods in a row drift, never on one batch or window: one
period's test has a false-alarm rate of about `alpha`, two in a row about alpha squared. The estimate is
low when the mean of the three estimates of `drifted_periods` periods in a row is more than
`estimate_drop` below the champion's test accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fmnist.data.feedback import ReviewedAnswer
from fmnist.evaluation import estimates
from fmnist.evaluation.evidence import EvidenceTotals, EvidenceWindow, sum_windows

MAX_PERIODS = 168  # periods one watch run judges (a week of hours)


class MonitorParams(BaseModel):
    """What the champion's monitor judges, and when it speaks (docs/rollout.md says how to tune it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lookback_s: float = Field(24 * 3600, gt=0, le=30 * 24 * 3600, description="How far back the report goes")
    period_s: float = Field(3600, ge=10, le=7 * 24 * 3600, description="Evidence judged together, in seconds")
    min_images: int = Field(500, ge=20, le=10_000_000, description="Periods with fewer images are not judged")
    alpha: float = Field(
        0.001, ge=estimates.MIN_ALPHA, lt=0.5, description="A period's false-alarm rate, before the correction"
    )
    drifted_periods: int = Field(2, ge=1, le=48, description="Periods in a row that must drift before it is said")
    estimate_drop: float = Field(
        0.05, ge=0, le=1, description="How far below its test accuracy the champion's estimate may fall"
    )

    @model_validator(mode="after")
    def _judgeable(self) -> MonitorParams:
        periods = self.lookback_s / self.period_s
        if periods > MAX_PERIODS:  # each run judges every period again: its time grows with them
            raise ValueError(f"lookback_s / period_s is {periods:g} periods; at most {MAX_PERIODS}")
        if periods < self.drifted_periods:
            raise ValueError(
                f"lookback_s holds {periods:g} periods of period_s, fewer than drifted_periods "
                f"({self.drifted_periods}): drift could never be said"
            )
        return self


@dataclass(frozen=True)
class Period:
    start: float
    end: float
    images: int
    judged: bool  # enough images to judge
    softmax_p: float | None  # the smallest per-class p-value of the softmax test
    class_mix_p: float | None
    drifted: bool
    estimates: dict[str, float]  # method -> estimated accuracy
    reviewed_images: int = 0  # answers of the period a reviewer labeled (the loop)
    reviewed_accuracy: float | None = None  # the truth the estimates are held to, where reviews exist


@dataclass(frozen=True)
class MonitorReport:
    version: str
    test_accuracy: float
    periods: list[Period]
    drift: bool  # the last `drifted_periods` judged periods all drifted
    estimate_low: bool
    # What the watch could not read: windows beyond what one read takes, and files (windows, ledgers) skipped.
    # With any, "no drift" is not a finding: the report and the task's log say so.
    left_out: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def latest_estimate(self) -> float | None:
        judged = [p for p in self.periods if p.judged and p.estimates]
        return mean(judged[-1].estimates.values()) if judged else None


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def periods_of(windows: list[EvidenceWindow], period_s: float) -> list[tuple[float, EvidenceTotals]]:
    """The windows summed per period (by each window's start), in time order."""
    grouped: dict[int, list[EvidenceWindow]] = {}
    for window in windows:
        grouped.setdefault(int(window.start // period_s), []).append(window)
    return [(index * period_s, sum_windows(grouped[index])) for index in sorted(grouped)]


def judge_period(
    start: float, totals: EvidenceTotals, calibration: estimates.Calibration, params: MonitorParams
) -> Period:
    end = start + params.period_s
    if totals.images < params.min_images:
        return Period(start, end, totals.images, False, None, None, False, {})
    softmax = estimates.softmax_shift(calibration.reference_probabilities, totals.probabilities, params.alpha)
    mix = estimates.class_mix_shift(calibration.reference_predicted, totals.predicted, params.alpha)
    accuracy = {
        "class mix": estimates.mix_weighted_accuracy(totals.predicted, calibration),
        "ATC": estimates.atc_estimate(totals.confidence, calibration),
        "CBPE": estimates.cbpe_estimate(totals.confidence, calibration),
    }
    drifted = softmax.drifted or mix.drifted
    return Period(start, end, totals.images, True, min(softmax.p_values), min(mix.p_values), drifted, accuracy)


def with_reviewed(period: Period, reviewed: Sequence[ReviewedAnswer]) -> Period:
    right = [a.correct for a in reviewed if period.start <= a.at < period.end]
    return replace(period, reviewed_images=len(right), reviewed_accuracy=sum(right) / len(right) if right else None)


def monitor(
    version: str,
    test_accuracy: float,
    windows: list[EvidenceWindow],
    calibration: estimates.Calibration,
    params: MonitorParams,
    reviewed: Sequence[ReviewedAnswer] = (),
) -> MonitorReport:
    """The champion's periods judged, and whether drift or a low estimate is to be said now; with the
    accuracy of each period's `reviewed` answers (the version's, labeled by reviewers) beside its estimates."""
    grouped = periods_of(windows, params.period_s)
    periods = [with_reviewed(judge_period(start, totals, calibration, params), reviewed) for start, totals in grouped]
    recent = [p for p in periods if p.judged][-params.drifted_periods :]
    enough = len(recent) == params.drifted_periods
    drift = enough and all(p.drifted for p in recent)
    low = enough and all(mean(p.estimates.values()) < test_accuracy - params.estimate_drop for p in recent)
    return MonitorReport(version, test_accuracy, periods, drift, low)
