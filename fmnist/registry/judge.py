"""The rollout judge: does a canary earn the champion's traffic on live evidence, or is it rolled back?

One rule, applied to everything the servers wrote since the rollout started (`fmnist.evaluation.evidence`):
each check below is `pass`, `fail`, `wait` (not enough evidence yet) or `unavailable` (nothing to judge
it by: no shadow traffic, a version registered before calibrations were kept).

- shadow agreement: on stable's requests copied to the canary, how often the two agree, against what
  the test set predicts for that pair under the live class mix (`expected_agreement`); fails when even
  the upper confidence bound is more than `agreement_margin` below the expectation, passes when the lower
  bound is within it. A canary that disagrees far more on live traffic than on the test set is caught.
- estimated accuracy, for both versions on the traffic each met, three ways: under the live class mix
  (held-out precision per predicted class), ATC and CBPE (calibrated confidence); fails when the canary's
  is more than `estimate_margin` below stable's by any of them, beyond their sampling error.
- reviewed accuracy, where the feedback loop's reviewers labeled at least MIN_REVIEWED answers of each
  since the rollout started: the truth, held to the same margin.
- service objectives: the canary's error rate (its lower confidence bound above `max_error_rate` fails)
  and its p99 latency (above `max_p99_ms` fails).

Decision: a failed check rolls the canary back. With at least `min_samples` images answered by the
canary (served or shadowed) and every available check passed, it is promoted. Otherwise the judge waits,
until `max_duration_s` after the start, when it decides on what it has: promoted if every check passed
(or has nothing to judge by), rolled back if the canary met no traffic or a check still lacks evidence
(stable's windows missing, too few images to tell): a canary is never promoted for want of evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from fmnist.evaluation import estimates
from fmnist.evaluation.evidence import LATENCY_BOUNDS_MS, MAX_WINDOWS, EvidenceTotals

Status = Literal["pass", "fail", "wait", "unavailable"]
MIN_REVIEWED = 30  # reviewed answers of each version before their accuracies are compared
Action = Literal["promote", "roll_back", "wait"]


class JudgeParams(BaseModel):
    """The rollout rule's thresholds (docs/rollout.md says what each means and how to tune it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_samples: StrictInt = Field(
        2000, ge=1, le=10_000_000, description="Images the canary must answer (served or shadowed) before a promotion"
    )
    max_duration_s: float = Field(
        24 * 3600, ge=60, le=30 * 24 * 3600, description="After this long the judge decides on the evidence it has"
    )
    agreement_margin: float = Field(
        0.05, ge=0, le=1, description="How far live agreement with stable may fall below what the test set predicts"
    )
    estimate_margin: float = Field(
        0.02, ge=0, le=1, description="How far the canary's estimated accuracy may fall below stable's"
    )
    z: float = Field(2.576, ge=1, le=10, description="Width of the confidence bounds, in standard errors (99%)")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Service objective: errors per request")
    max_p99_ms: float = Field(1000, ge=1, le=600_000, description="Service objective: p99 latency, milliseconds")


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    canary: float | None  # the canary's figure (agreement, an accuracy estimate, a rate)
    reference: float | None  # what it is held against (the expectation, stable's estimate, the objective)
    detail: str


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    checks: list[Check] = field(default_factory=list)
    canary_images: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> dict:
        """What the decision's records and events carry: small, and JSON."""
        return {
            "action": self.action,
            "reason": self.reason,
            "canary_images": self.canary_images,
            "elapsed_s": round(self.elapsed_s, 1),
            "checks": {
                c.name: {"status": c.status, "canary": finite(c.canary), "reference": c.reference, "detail": c.detail}
                for c in self.checks
            },
        }


def finite(value: float | None) -> float | None:
    """JSON has no infinity (a p99 beyond the last latency bound): None, which the detail explains."""
    return value if value is None or math.isfinite(value) else None


@dataclass(frozen=True)
class LiveEvidence:
    """What the servers saw of a rollout's two versions since it started."""

    canary: EvidenceTotals  # served and shadowed, together
    stable: EvidenceTotals  # served as stable
    pairs: np.ndarray | None  # stable's class x the canary's, on shadowed requests against the champion
    elapsed_s: float
    # Answers a reviewer labeled since the rollout started (the loop): (right, reviewed) of each version.
    reviewed_canary: tuple[int, int] = (0, 0)
    reviewed_stable: tuple[int, int] = (0, 0)
    left_out: int = 0  # windows in range the judge did not read (beyond MAX_WINDOWS): it vouches for nothing then


@dataclass(frozen=True)
class Offline:
    """What registration kept of each version for the judge: calibrations, and test-set predictions."""

    canary_calibration: estimates.Calibration | None
    stable_calibration: estimates.Calibration | None
    canary_predictions: np.ndarray | None  # argmax on the test set
    stable_predictions: np.ndarray | None


def judge(evidence: LiveEvidence, offline: Offline, params: JudgeParams) -> Verdict:
    """The rule above, on `evidence`."""
    checks = [
        _agreement(evidence, offline, params),
        *_estimates(evidence, offline, params),
        _reviewed(evidence, params),
        *_objectives(evidence, params),
    ]
    images = evidence.canary.images
    failed = [c for c in checks if c.status == "fail"]

    def verdict(action: Action, reason: str) -> Verdict:
        return Verdict(action, reason, checks, images, evidence.elapsed_s)

    if failed:
        return verdict("roll_back", "; ".join(f"{c.name}: {c.detail}" for c in failed))
    timed_out = evidence.elapsed_s >= params.max_duration_s
    if evidence.left_out:  # a failure may lie in what was not read: never promote on part of the evidence
        unread = (
            f"{evidence.left_out} evidence windows beyond the {MAX_WINDOWS} the judge reads (write fewer: a longer "
            "--evidence-window-s); decide by hand: `fashion-mnist rollout promote` or `rollout abort`"
        )
        return verdict("roll_back" if timed_out else "wait", unread)
    if images >= params.min_samples and all(c.status in ("pass", "unavailable") for c in checks):
        passed = ", ".join(c.name for c in checks if c.status == "pass") or "no check had evidence"
        return verdict("promote", f"{images} live images; every check passed ({passed})")
    if timed_out:  # what it has: a check still waiting for evidence is no pass
        if images == 0:
            return verdict("roll_back", f"no live traffic reached the canary in {params.max_duration_s:.0f} s")
        waiting = [c.name for c in checks if c.status == "wait"]
        if waiting:
            return verdict(
                "roll_back",
                f"{params.max_duration_s:.0f} s passed with {images} live images ({params.min_samples} asked for) "
                f"and still too little evidence for {', '.join(waiting)}",
            )
        return verdict(
            "promote",
            f"{params.max_duration_s:.0f} s passed with {images} live images ({params.min_samples} asked for) "
            "and every check passed",
        )
    waiting = ", ".join(c.name for c in checks if c.status == "wait")
    return verdict("wait", f"{images} of {params.min_samples} images" + (f"; waiting on {waiting}" if waiting else ""))


def _agreement(evidence: LiveEvidence, offline: Offline, params: JudgeParams) -> Check:
    name = "shadow agreement"
    if evidence.pairs is None or not evidence.pairs.sum():
        return Check(name, "unavailable", None, None, "no shadowed request against the champion")
    if offline.canary_predictions is None or offline.stable_predictions is None:
        return Check(name, "unavailable", None, None, "a version without test-set predictions (registered before)")
    pairs = evidence.pairs
    n, agreed = int(pairs.sum()), int(np.trace(pairs))
    expected = estimates.expected_agreement(offline.stable_predictions, offline.canary_predictions, pairs.sum(axis=1))
    low, high = estimates.wilson_interval(agreed, n, params.z)
    live = agreed / n
    bound = expected - params.agreement_margin
    detail = f"{live:.3f} live on {n} images ({low:.3f}-{high:.3f}), {expected:.3f} expected from the test set"
    if high < bound:
        return Check(name, "fail", live, expected, detail + f": below {bound:.3f}")
    if low >= bound:
        return Check(name, "pass", live, expected, detail)
    return Check(name, "wait", live, expected, detail)  # neither bound clear of it yet: more evidence tells


def _estimates(evidence: LiveEvidence, offline: Offline, params: JudgeParams) -> list[Check]:
    ways = {
        "accuracy under the live class mix": lambda totals, c: estimates.mix_weighted_accuracy(totals.predicted, c),
        "accuracy by ATC": lambda totals, c: estimates.atc_estimate(totals.confidence, c),
        "accuracy by CBPE": lambda totals, c: estimates.cbpe_estimate(totals.confidence, c),
    }
    canary_cal, stable_cal = offline.canary_calibration, offline.stable_calibration
    checks = []
    for name, estimate in ways.items():
        if canary_cal is None or stable_cal is None:
            checks.append(Check(name, "unavailable", None, None, "a version without a calibration (registered before)"))
            continue
        if not evidence.canary.images or not evidence.stable.images:
            checks.append(Check(name, "wait", None, None, "no live images yet for both versions"))
            continue
        canary, stable = estimate(evidence.canary, canary_cal), estimate(evidence.stable, stable_cal)
        # Each estimate is a mean over the images each version met: its sampling error shrinks with them.
        spread = params.z * math.sqrt(
            _variance(canary, evidence.canary.images) + _variance(stable, evidence.stable.images)
        )
        detail = f"canary {canary:.3f} against stable {stable:.3f} (+/- {spread:.3f})"
        if stable - canary - spread > params.estimate_margin:
            detail += f": more than {params.estimate_margin} below"
            checks.append(Check(name, "fail", canary, stable, detail))
        elif evidence.canary.images >= params.min_samples:
            checks.append(Check(name, "pass", canary, stable, detail))
        else:
            checks.append(Check(name, "wait", canary, stable, detail))
    return checks


def _reviewed(evidence: LiveEvidence, params: JudgeParams) -> Check:
    """The truth where the loop has it: the share of each version's reviewed answers that were right."""
    name = "accuracy on reviewed images"
    (canary_right, canary_n), (stable_right, stable_n) = evidence.reviewed_canary, evidence.reviewed_stable
    counted = f"{canary_n} of the canary's and {stable_n} of stable's answers reviewed"
    if min(canary_n, stable_n) < MIN_REVIEWED:
        return Check(name, "unavailable", None, None, f"{counted}: fewer than {MIN_REVIEWED} of either")
    canary, stable = canary_right / canary_n, stable_right / stable_n
    spread = params.z * math.sqrt(_variance(canary, canary_n) + _variance(stable, stable_n))
    detail = f"canary {canary:.3f} against stable {stable:.3f} (+/- {spread:.3f}; {counted})"
    if stable - canary - spread > params.estimate_margin:
        return Check(name, "fail", canary, stable, detail + f": more than {params.estimate_margin} below")
    return Check(name, "pass", canary, stable, detail)


def _variance(share: float, images: int) -> float:
    """The sampling variance of a mean of `images` per-image chances whose mean is `share` (at most)."""
    return share * (1 - share) / images


def _objectives(evidence: LiveEvidence, params: JudgeParams) -> list[Check]:
    """Over every call of the canary's model, for clients and shadowed alike: a request refused before it
    reached the model (a bad body, too big) is the client's, and counted neither way."""
    canary = evidence.canary
    calls = sum(canary.latency_ms)  # the windows' latency holds the requests that reached a model call
    if not calls:
        return [Check("service objectives", "unavailable", None, None, "no call of the canary's model yet")]
    failures = canary.model_failures
    rate = failures / calls
    low, _ = estimates.wilson_interval(failures, calls, params.z)
    detail = f"{failures} failed in {calls} model calls ({rate:.4f})"
    if low > params.max_error_rate:
        error_rate = Check(
            "error rate", "fail", rate, params.max_error_rate, f"{detail}, above {params.max_error_rate}"
        )
    else:
        error_rate = Check("error rate", "pass", rate, params.max_error_rate, detail)
    p99 = p99_ms(canary.latency_ms)
    latency = f"p99 at most {p99:g} ms" if math.isfinite(p99) else f"p99 above {LATENCY_BOUNDS_MS[-1]} ms"
    status: Status = "fail" if p99 > params.max_p99_ms else "pass"
    return [error_rate, Check("p99 latency", status, p99, params.max_p99_ms, latency)]


def p99_ms(latency_counts: list[int]) -> float:
    """The upper bound of the latency bin holding the 99th percentile (inf: beyond the last bound)."""
    counts = np.asarray(latency_counts)
    if not counts.sum():
        return 0.0
    index = int(np.searchsorted(np.cumsum(counts), 0.99 * counts.sum()))
    return float(LATENCY_BOUNDS_MS[index]) if index < len(LATENCY_BOUNDS_MS) else float("inf")
