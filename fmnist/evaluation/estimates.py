"""What a model's answers say about its accuracy and its inputs when no labels come with them.

Fitted once, at registration, on the held-out labeled test set (`fit_calibration`), kept in the version's
manifest (`Calibration`), and applied to the live evidence windows' histograms (fmnist.evaluation.evidence),
never to raw images:

- `atc_estimate`: Average Thresholded Confidence (Garg et al., ICLR 2022): the share of live images whose
  top-class confidence exceeds the threshold that, on the held-out set, leaves exactly the accuracy above it.
- `cbpe_estimate`: confidence-based performance estimation (NannyML's CBPE): each live image counts the
  held-out accuracy of its confidence bin.
- `mix_weighted_accuracy`: each predicted class's held-out precision, weighted by how often it is predicted
  live: what a class-mix (label) shift does to accuracy when the confidence does not move.
- `expected_agreement`: how often two versions should agree on live traffic, from their held-out predictions.
- `softmax_shift` and `class_mix_shift`: two-sample tests of the live window against the held-out reference
  (black-box shift detection on the softmax outputs, Rabanser et al. 2019; the predicted-class mix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from fmnist.data.dataset import NUM_CLASSES
from fmnist.evaluation.evidence import CONFIDENCE_BINS, PROBABILITY_BINS

MIN_BIN_IMAGES = 30  # held-out images a confidence bin's accuracy is read from; a sparser bin is pooled
POOL_RADIUS = 5  # bins each side a sparse bin pools with (0.05 of confidence at CONFIDENCE_BINS = 100)
MIN_EXPECTED = 5  # Cochran's rule: the live count a chi-squared cell is expected to hold, at least
RESAMPLES = 2000  # Monte Carlo draws behind a drift test's p-value: its smallest is 1 / 2001
# A statistic beyond every draw is drawn again this many times the test's threshold's inverse, so that its
# p-value can fall below the threshold (1 / 2001 is above alpha / 10 for alpha under 0.005).
RESOLUTION = 2
MAX_RESAMPLES = 200_000  # the most draws a test makes: a threshold needing more is refused (alpha too small)
MIN_ALPHA = RESOLUTION * NUM_CLASSES / MAX_RESAMPLES  # the smallest alpha the softmax test resolves
HYPERGEOMETRIC_LIMIT = 10**9  # images in a table numpy draws without replacement from, at most
RESAMPLING_SEED = 0  # fixed: the same window always gets the same verdict
MAX_HELD_OUT = 10**8  # held-out images a Calibration may claim: a count beyond is damage, not a test set
ROW_SUM_TOLERANCE = 1e-3  # how far a row of probabilities may sum from 1 (float32 softmax)

Share = Annotated[StrictFloat, Field(ge=0, le=1)]
Count = Annotated[StrictInt, Field(ge=0, le=MAX_HELD_OUT)]
Histogram = Annotated[list[Count], Field(min_length=PROBABILITY_BINS, max_length=PROBABILITY_BINS)]


class Calibration(BaseModel):
    """A version's answers on the held-out test set, summed up for the label-free estimates and the drift tests."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    images: StrictInt = Field(ge=1, le=MAX_HELD_OUT, description="held-out images it was fitted on")
    atc_threshold: Share = Field(description="top-class confidence above which the held-out accuracy's share lies")
    bin_accuracy: list[Share] = Field(
        min_length=CONFIDENCE_BINS, max_length=CONFIDENCE_BINS, description="held-out accuracy per confidence bin"
    )
    precision: list[Share] = Field(
        min_length=NUM_CLASSES, max_length=NUM_CLASSES, description="P(correct | predicted class), 0 if never"
    )
    reference_predicted: list[Count] = Field(
        min_length=NUM_CLASSES, max_length=NUM_CLASSES, description="held-out images predicted as each class"
    )
    reference_probabilities: list[Histogram] = Field(
        min_length=NUM_CLASSES, max_length=NUM_CLASSES, description="each class's probability histogram"
    )

    @model_validator(mode="after")
    def _adds_up(self) -> Calibration:
        if (predicted := sum(self.reference_predicted)) != self.images:
            raise ValueError(f"reference_predicted adds up to {predicted}, not images {self.images}")
        for label, row in enumerate(self.reference_probabilities):
            if sum(row) != self.images:
                raise ValueError(f"reference_probabilities[{label}] adds up to {sum(row)}, not images {self.images}")
        return self


def confidence_counts(probabilities: np.ndarray) -> np.ndarray:
    """The top-class confidence histogram of `probabilities` (images x classes), binned as
    `fmnist.evaluation.evidence.confidence_bin` bins one image."""
    return _histogram(probabilities.max(axis=1), CONFIDENCE_BINS)


def probability_counts(probabilities: np.ndarray) -> np.ndarray:
    """Each class's probability histogram (classes x PROBABILITY_BINS), as an evidence window holds them."""
    return np.stack([_histogram(probabilities[:, label], PROBABILITY_BINS) for label in range(NUM_CLASSES)])


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    index = np.minimum((values.astype(np.float64) * bins).astype(np.int64), bins - 1)
    return np.bincount(index, minlength=bins)


def fit_calibration(probabilities: np.ndarray, labels: np.ndarray) -> Calibration:
    """The held-out set's calibration: `probabilities` (images x classes) a version gave the images whose true
    classes are `labels`."""
    probabilities, labels = _checked_labeled(probabilities, labels)
    predicted = probabilities.argmax(axis=1)
    correct = predicted == labels
    confidence_bins = np.minimum((probabilities.max(axis=1) * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)
    in_bin = np.bincount(confidence_bins, minlength=CONFIDENCE_BINS)
    hits_in_bin = np.bincount(confidence_bins, weights=correct, minlength=CONFIDENCE_BINS)
    predicted_counts = np.bincount(predicted, minlength=NUM_CLASSES)
    hits_per_class = np.bincount(predicted, weights=correct, minlength=NUM_CLASSES)
    return Calibration(
        images=len(labels),
        atc_threshold=_threshold_leaving(in_bin, float(correct.mean())),
        bin_accuracy=_pooled_bin_accuracy(in_bin, hits_in_bin),
        precision=[float(h / n) if n else 0.0 for h, n in zip(hits_per_class, predicted_counts, strict=True)],
        reference_predicted=predicted_counts.tolist(),
        reference_probabilities=probability_counts(probabilities).tolist(),
    )


def _checked_labeled(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities, labels = np.asarray(probabilities), np.asarray(labels)
    if probabilities.ndim != 2 or probabilities.shape[1] != NUM_CLASSES or len(probabilities) == 0:
        raise ValueError(f"probabilities are images x {NUM_CLASSES}, at least one image; got {probabilities.shape}")
    if labels.shape != (len(probabilities),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels are {len(probabilities)} integers, one per image; got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels are class numbers 0 to {NUM_CLASSES - 1}; got {labels.min()} to {labels.max()}")
    probabilities = probabilities.astype(np.float64)
    if not np.isfinite(probabilities).all() or probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("probabilities must be finite and in [0, 1]")
    if np.abs(probabilities.sum(axis=1) - 1).max() > ROW_SUM_TOLERANCE:
        raise ValueError(f"each image's probabilities must sum to 1 (within {ROW_SUM_TOLERANCE})")
    return probabilities, labels.astype(np.int64)


def _share_above(counts: np.ndarray, threshold: float) -> float:
    """The share of images whose confidence exceeds `threshold`, images spread evenly inside each bin."""
    inside = min(int(threshold * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)
    part_above = (inside + 1) - threshold * CONFIDENCE_BINS  # of the threshold's own bin
    return float((counts[inside + 1 :].sum() + counts[inside] * part_above) / counts.sum())


def _threshold_leaving(counts: np.ndarray, share: float) -> float:
    """The confidence `t` with `_share_above(counts, t) == share`: the ATC threshold, found on the same bins
    the live windows are counted in, so that applied to the held-out set itself it gives back its accuracy."""
    total = counts.sum()
    if share >= 1:
        return float(np.flatnonzero(counts)[0] / CONFIDENCE_BINS)  # every image is above the lowest bin's start
    target = share * total
    above = total - np.cumsum(counts)  # images in the bins above each bin
    inside = int(np.argmax(above <= target))  # the first bin whose top leaves no more than the target above
    # above[inside - 1] > target, so counts[inside] > target - above[inside] >= 0: never a division by zero.
    part_above = (target - above[inside]) / counts[inside]
    return float((inside + 1 - part_above) / CONFIDENCE_BINS)


def _pooled_bin_accuracy(in_bin: np.ndarray, hits_in_bin: np.ndarray) -> list[float]:
    """Each confidence bin's held-out accuracy. A bin with fewer than MIN_BIN_IMAGES images pools its
    neighbours, up to POOL_RADIUS bins each side, until the pool holds that many; a pool still short of
    them is topped up with pseudo-images as accurate as the bin's own confidence (what a calibrated model
    would score), so an empty region reads as calibrated and a sparse one leans on it only as far as the
    images are missing."""
    accuracy = []
    for index in range(CONFIDENCE_BINS):
        for radius in range(POOL_RADIUS + 1):
            low, high = max(0, index - radius), min(CONFIDENCE_BINS, index + radius + 1)
            images = float(in_bin[low:high].sum())
            if images >= MIN_BIN_IMAGES:
                break
        pseudo = max(0.0, MIN_BIN_IMAGES - images)
        midpoint = (index + 0.5) / CONFIDENCE_BINS
        accuracy.append(float((hits_in_bin[low:high].sum() + pseudo * midpoint) / (images + pseudo)))
    return accuracy


def _checked_counts(counts: object, length: int, what: str) -> np.ndarray:
    array = np.asarray(counts)
    if array.shape != (length,) or array.dtype.kind not in "iu" or (array < 0).any():
        raise ValueError(f"{what} are {length} non-negative integer counts; got {array.dtype} {array.shape}")
    if array.sum() == 0:
        raise ValueError(f"{what} count no images: there is nothing to estimate from")
    return array.astype(np.int64)


def atc_estimate(confidence_counts: object, calibration: Calibration) -> float:
    """ATC's accuracy estimate for a window's top-class confidence histogram (CONFIDENCE_BINS counts)."""
    counts = _checked_counts(confidence_counts, CONFIDENCE_BINS, "confidence counts")
    return _share_above(counts, calibration.atc_threshold)


def cbpe_estimate(confidence_counts: object, calibration: Calibration) -> float:
    """The expected accuracy of a window's images, each counted at its confidence bin's held-out accuracy."""
    counts = _checked_counts(confidence_counts, CONFIDENCE_BINS, "confidence counts")
    return float(counts @ np.asarray(calibration.bin_accuracy) / counts.sum())


def mix_weighted_accuracy(predicted_counts: object, calibration: Calibration) -> float:
    """Sum over classes of the window's share of images predicted as that class times the class's held-out
    precision. A model confidently wrong on some classes keeps its confidence when they grow common, so ATC
    and CBPE miss it; this sees it in the precision of the classes it predicts. A class the held-out set
    never saw predicted has precision 0: there is no evidence those answers are right."""
    counts = _checked_counts(predicted_counts, NUM_CLASSES, "predicted-class counts")
    return float(counts @ np.asarray(calibration.precision) / counts.sum())


def expected_agreement(stable_predictions: np.ndarray, candidate_predictions: np.ndarray, stable_mix: object) -> float:
    """How often a candidate should agree with stable on live traffic whose images stable predicts as
    `stable_mix` (counts per class): per class stable predicts on the held-out images, the share of them on
    which the candidate predicts the same, weighted by the live mix.

    A class stable never predicted on the held-out images counts as full disagreement: nothing offline says
    the pair agrees there, and an expectation is a bar the live agreement is held to, so it holds none
    for answers it has no evidence about (a stable model that never predicts a class on 10,000 test images is
    broken anyway)."""
    stable, candidate = np.asarray(stable_predictions), np.asarray(candidate_predictions)
    if stable.ndim != 1 or stable.shape != candidate.shape or len(stable) == 0:
        raise ValueError(f"two versions' predictions on the same images; got shapes {stable.shape}, {candidate.shape}")
    for predictions in (stable, candidate):
        if predictions.dtype.kind not in "iu" or predictions.min() < 0 or predictions.max() >= NUM_CLASSES:
            raise ValueError(f"predictions are class numbers 0 to {NUM_CLASSES - 1}")
    mix = _checked_counts(stable_mix, NUM_CLASSES, "stable's predicted-class counts")
    stable = stable.astype(np.int64)
    predicted = np.bincount(stable, minlength=NUM_CLASSES)
    agreed = np.bincount(stable, weights=stable == candidate, minlength=NUM_CLASSES)
    per_class = np.divide(agreed, predicted, out=np.zeros(NUM_CLASSES), where=predicted > 0)
    return float(mix @ per_class / mix.sum())


def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's score interval for a proportion: `successes` of `n`, `z` standard errors each side.
    It stays inside [0, 1] and keeps its coverage at small n and at proportions near 0 or 1, where
    the normal approximation does neither; n = 0 says nothing: (0, 1)."""
    integers = all(isinstance(k, int | np.integer) and not isinstance(k, bool) for k in (successes, n))
    if not (integers and 0 <= successes <= n) or not (math.isfinite(z) and z > 0):
        raise ValueError(f"a Wilson interval needs 0 <= successes <= n and z > 0; got {successes}, {n}, {z}")
    if n == 0:
        return 0.0, 1.0
    share, spread = successes / n, z * z / n
    centre = (share + spread / 2) / (1 + spread)
    half = z / (1 + spread) * math.sqrt(share * (1 - share) / n + spread / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ShiftTest:
    """A two-sample test of a live window against the held-out reference: one statistic and p-value per
    dimension tested, the per-dimension threshold after the Bonferroni correction, and the verdict."""

    statistics: tuple[float, ...]
    p_values: tuple[float, ...]
    threshold: float  # a p-value below it in any dimension is drift
    drifted: bool


def softmax_shift(reference: object, live: object, alpha: float) -> ShiftTest:
    """Black-box shift detection on the softmax outputs: per class, a chi-squared test of homogeneity of the
    reference's and the live window's probability histograms (classes x PROBABILITY_BINS counts), each
    at alpha / NUM_CLASSES (Bonferroni: the family of ten stays at `alpha` whatever their dependence)."""
    _check_alpha(alpha, alpha / NUM_CLASSES)
    reference_rows = _checked_table(reference, "reference probability histograms")
    live_rows = _checked_table(live, "live probability histograms")
    threshold = alpha / NUM_CLASSES
    order = np.arange(PROBABILITY_BINS)
    tests = [_homogeneity(r, w, order, threshold) for r, w in zip(reference_rows, live_rows, strict=True)]
    return _verdict(tests, threshold)


def class_mix_shift(reference_counts: object, live_counts: object, alpha: float) -> ShiftTest:
    """A chi-squared test of homogeneity of the reference's and the live window's predicted-class counts."""
    _check_alpha(alpha, alpha)
    reference = _checked_counts(reference_counts, NUM_CLASSES, "reference predicted-class counts")
    live = np.asarray(live_counts)
    if live.shape != (NUM_CLASSES,) or live.dtype.kind not in "iu" or (live < 0).any():
        raise ValueError(
            f"live predicted-class counts are {NUM_CLASSES} non-negative integers; got {live.dtype} {live.shape}"
        )
    # Classes have no order: the rarest ones (in the reference) are the ones pooled together.
    order = np.argsort(reference, kind="stable")
    return _verdict([_homogeneity(reference, live.astype(np.int64), order, alpha)], alpha)


def _check_alpha(alpha: float, threshold: float) -> None:
    if not (0 < alpha < 1):
        raise ValueError(f"alpha is a false-alarm rate in (0, 1); got {alpha}")
    if RESOLUTION / threshold > MAX_RESAMPLES:
        raise ValueError(f"alpha {alpha} needs more than {MAX_RESAMPLES} draws to resolve; at least {MIN_ALPHA}")


def _checked_table(counts: object, what: str) -> np.ndarray:
    table = np.asarray(counts)
    if table.shape != (NUM_CLASSES, PROBABILITY_BINS) or table.dtype.kind not in "iu" or (table < 0).any():
        raise ValueError(
            f"{what} are {NUM_CLASSES} x {PROBABILITY_BINS} non-negative integers; got {table.dtype} {table.shape}"
        )
    return table.astype(np.int64)


def _homogeneity(reference: np.ndarray, live: np.ndarray, order: np.ndarray, threshold: float) -> tuple[float, float]:
    """Chi-squared statistic of homogeneity of `reference` and `live` (counts over the same cells), and its
    p-value by Monte Carlo, conditional on the table's margins (as R's `chisq.test(simulate.p.value = TRUE)`):
    RESAMPLES rows are drawn from the column totals without replacement (what H0 makes of them) and
    p = (1 + draws at least as extreme) / (1 + RESAMPLES), a valid p-value whatever the counts. A statistic
    beyond all of them, whose p-value could not reach `threshold`, is drawn against again, RESOLUTION / threshold
    times: only a window that looks drifted pays for the finer p-value.

    The asymptotic chi-squared p-value is not: the reference (10,000 held-out images) dwarfs a live window of a
    few hundred, most cells expect under one live image, and at the Bonferroni level (0.005) the chi-squared
    distribution's tail is too light for the statistic: 0.0074 of undrifted windows fell below 0.005 in a
    simulation of 1,500 windows of 1,000 images, even with cells pooled to Cochran's five. Cells are still
    pooled, in `order`, until each group expects MIN_EXPECTED live images by the reference's shares (a group
    of near-empty cells only adds noise to the statistic); the grouping depends on the reference and the
    window's size only, never on what the window holds.
    """
    live_total, reference_total = int(live.sum()), int(reference.sum())
    if live_total == 0 or reference_total == 0:
        return 0.0, 1.0
    groups = _groups(reference[order] * live_total / reference_total)
    columns = np.stack([np.bincount(groups, weights=counts[order]).astype(np.int64) for counts in (reference, live)])
    columns = columns[:, columns.sum(axis=0) > 0]
    if columns.shape[1] < 2:
        return 0.0, 1.0
    totals = columns.sum(axis=0)
    # The statistic is the same whichever row it is computed from: draw the smaller one.
    row = columns[int(live_total < reference_total)]
    statistic = _chi_squared(row, totals, int(row.sum()))
    resamples = RESAMPLES
    while True:
        drawn = _draws(totals, int(row.sum()), np.random.default_rng(RESAMPLING_SEED), resamples)
        extreme = int((_chi_squared(drawn, totals, int(row.sum())) >= statistic * (1 - 1e-12)).sum())
        if extreme or 1 / (1 + resamples) < threshold or resamples > RESAMPLES:
            return float(statistic), (1 + extreme) / (1 + resamples)
        resamples = math.ceil(RESOLUTION / threshold)


def _draws(totals: np.ndarray, size: int, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """`resamples` rows of `size` images drawn from the column totals without replacement; with replacement
    where numpy cannot (a table of HYPERGEOMETRIC_LIMIT images or more: months of windows summed, or a
    damaged count), which only widens the draws (by the share drawn, at most half): fewer false alarms."""
    if totals.sum() < HYPERGEOMETRIC_LIMIT:
        return rng.multivariate_hypergeometric(totals, size, size=resamples)
    return rng.multinomial(size, totals / totals.sum(), size=resamples)


def _groups(expected_live: np.ndarray) -> np.ndarray:
    """Consecutive cells pooled until each group expects MIN_EXPECTED live images; a short last group joins
    the one before it."""
    groups, running, group = np.zeros(len(expected_live), dtype=np.int64), 0.0, 0
    for position, expected in enumerate(expected_live):
        groups[position] = group
        running += expected
        if running >= MIN_EXPECTED:
            group, running = group + 1, 0.0
    if running < MIN_EXPECTED and group > 0:
        groups[groups == group] = group - 1
    return groups


def _chi_squared(live_rows: np.ndarray, totals: np.ndarray, live_total: int) -> np.ndarray:
    """Pearson's statistic of the 2 x cells tables whose one row is `live_rows` (one table per last-axis row),
    of `live_total` images, and whose column totals are `totals`: the other row is the rest."""
    totals = totals.astype(np.float64)  # products of counts overflow int64 beyond a few billion images
    grand = totals.sum()
    expected_live = totals * live_total / grand
    expected_reference = totals * (grand - live_total) / grand
    reference_rows = totals - live_rows
    return ((live_rows - expected_live) ** 2 / expected_live).sum(axis=-1) + (
        (reference_rows - expected_reference) ** 2 / expected_reference
    ).sum(axis=-1)


def _verdict(tests: list[tuple[float, float]], threshold: float) -> ShiftTest:
    statistics, p_values = zip(*tests, strict=True)
    return ShiftTest(tuple(statistics), tuple(p_values), threshold, any(p < threshold for p in p_values))
