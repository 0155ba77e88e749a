"""The label-free accuracy estimates, the agreement expectation and the drift tests, on synthetic answers
whose true accuracy is known: a model calibrated by construction (an image's top-class confidence is the
chance that its top class is right), whose confidence depends on the class (class 0 is the hardest, 9 the
easiest), so that a class-mix shift moves its accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.stats import binomtest

from fmnist.evaluation.estimates import (
    CONFIDENCE_BINS,
    MIN_BIN_IMAGES,
    Calibration,
    atc_estimate,
    cbpe_estimate,
    class_mix_shift,
    confidence_counts,
    expected_agreement,
    fit_calibration,
    mix_weighted_accuracy,
    probability_counts,
    softmax_shift,
    wilson_interval,
)

EASE = np.array([2.0, 3, 5, 8, 12, 16, 20, 25, 30, 40])  # class k's confidence: 0.3 + 0.7 * Beta(EASE[k], 1)
HELD_OUT = 10_000  # the test set's size
UNSHIFTED = np.ones(10)
HARD_MIX = np.array([3, 3, 2, 1, 1, 1, 1, 1, 1, 1.0])  # traffic rich in the hardest classes
RICH_IN_SWAPPED = np.array([1, 1, 1, 1, 1, 1, 1, 1, 8, 8.0])  # traffic rich in the two classes a model swaps


def answers(labels: np.ndarray, rng: np.random.Generator, *, swapped: float = 0.0, ease=EASE) -> np.ndarray:
    """A synthetic model's probabilities for images of classes `labels`. With `swapped`, that share of the
    images of classes 8 and 9 (its most confident) is answered as the other class, as confidently as a right
    answer: a model trained with two classes partly swapped."""
    n = len(labels)
    confidence = 0.3 + 0.7 * rng.beta(ease[labels], 1.0)
    top = np.where(rng.random(n) < confidence, labels, (labels + rng.integers(1, 10, n)) % 10)
    top = np.where((labels >= 8) & (rng.random(n) < swapped), 17 - labels, top)
    probabilities = np.zeros((n, 10))
    others = np.ones((n, 10), dtype=bool)
    others[np.arange(n), top] = False
    probabilities[others] = (rng.dirichlet(np.full(9, 20.0), n) * (1 - confidence)[:, None]).ravel()
    probabilities[np.arange(n), top] = confidence
    return probabilities


def labels_of(mix: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(10, n, p=mix / mix.sum())


def fitted(seed: int, *, swapped: float = 0.0) -> tuple[Calibration, np.random.Generator]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, HELD_OUT)
    return fit_calibration(answers(labels, rng, swapped=swapped), labels), rng


def estimates_and_truth(calibration: Calibration, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    counts = confidence_counts(probabilities)
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=10)
    return {
        "truth": float((probabilities.argmax(axis=1) == labels).mean()),
        "atc": atc_estimate(counts, calibration),
        "cbpe": cbpe_estimate(counts, calibration),
        "mix": mix_weighted_accuracy(predicted, calibration),
    }


def test_on_the_held_out_set_itself_atc_gives_back_its_accuracy() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, HELD_OUT)
    probabilities = answers(labels, rng)
    calibration = fit_calibration(probabilities, labels)
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    # The threshold is found on the same bins the live windows are counted in: no binning error at home.
    assert atc_estimate(confidence_counts(probabilities), calibration) == pytest.approx(accuracy, abs=1e-9)
    assert mix_weighted_accuracy(np.bincount(probabilities.argmax(axis=1), minlength=10), calibration) == (
        pytest.approx(accuracy, abs=1e-9)
    )
    assert 0.3 < calibration.atc_threshold < 1 and calibration.images == HELD_OUT
    assert sum(calibration.reference_predicted) == HELD_OUT
    assert all(sum(row) == HELD_OUT for row in calibration.reference_probabilities)


@pytest.mark.parametrize(
    ("mix", "atc_error", "cbpe_error"),
    [
        (UNSHIFTED, 0.01, 0.01),
        # ATC reads a share above a threshold, not an expectation: when the hard classes grow common it
        # underestimates (by 0.03-0.04 here); CBPE, on a calibrated model, stays on the truth.
        (HARD_MIX, 0.05, 0.01),
    ],
    ids=["unshifted", "mix-shifted"],
)
def test_atc_and_cbpe_are_near_the_true_accuracy(mix: np.ndarray, atc_error: float, cbpe_error: float) -> None:
    calibration, rng = fitted(2)
    labels = labels_of(mix, 20_000, rng)
    found = estimates_and_truth(calibration, labels, answers(labels, rng))
    assert abs(found["atc"] - found["truth"]) <= atc_error, found
    assert abs(found["cbpe"] - found["truth"]) <= cbpe_error, found
    if mix is HARD_MIX:
        assert found["truth"] < 0.9 < calibration.bin_accuracy[-1], "the shift must move the accuracy"


def test_a_model_confidently_wrong_on_two_swapped_classes_is_seen_only_by_the_class_mix() -> None:
    """40% of classes 8 and 9 answered as the other, confidently; the traffic then turns rich in them.
    ATC says about 0.94 and CBPE 0.85 (the confidence did not move) when the truth is 0.69; the class-mix
    estimate reads the held-out precision of 8 and 9 (about 0.6) and says about 0.67."""
    calibration, rng = fitted(3, swapped=0.4)
    labels = labels_of(RICH_IN_SWAPPED, 20_000, rng)
    found = estimates_and_truth(calibration, labels, answers(labels, rng, swapped=0.4))
    assert found["truth"] < 0.72
    assert found["atc"] - found["truth"] > 0.2 and found["cbpe"] - found["truth"] > 0.1, found
    assert abs(found["mix"] - found["truth"]) <= 0.04, found


def test_sparse_confidence_bins_pool_their_neighbours_and_empty_ones_read_as_calibrated() -> None:
    calibration, _ = fitted(4)
    # Top-class confidence is at least 0.3 here: the bins below hold no image and read their own confidence.
    assert calibration.bin_accuracy[5] == pytest.approx(0.055)
    # A top class of 10 classes is at least 0.1 likely; one image alone never sets its bin's accuracy.
    probabilities = np.full((MIN_BIN_IMAGES + 1, 10), 0.05)
    probabilities[:, 0] = 0.55
    probabilities[0] = [0.05] * 9 + [0.55]  # one wrong image (class 0 answered 9) in the 0.55 bin
    labels = np.zeros(MIN_BIN_IMAGES + 1, dtype=np.int64)
    single = fit_calibration(probabilities, labels)
    assert single.bin_accuracy[55] == pytest.approx(MIN_BIN_IMAGES / (MIN_BIN_IMAGES + 1))
    # Bin 60 is five bins away: it pools bin 55's 31 images, so it no longer reads its own confidence.
    assert single.bin_accuracy[60] == pytest.approx(MIN_BIN_IMAGES / (MIN_BIN_IMAGES + 1))
    assert single.bin_accuracy[61] == pytest.approx(0.615)  # beyond the pooling radius: calibrated
    assert len(single.bin_accuracy) == CONFIDENCE_BINS


def test_estimates_refuse_what_is_not_a_histogram() -> None:
    calibration, _ = fitted(5)
    with pytest.raises(ValueError, match="confidence counts are 100 non-negative integer counts"):
        atc_estimate([1] * 99, calibration)
    with pytest.raises(ValueError, match="confidence counts count no images"):
        cbpe_estimate([0] * 100, calibration)
    with pytest.raises(ValueError, match="predicted-class counts are 10 non-negative integer counts"):
        mix_weighted_accuracy([1.5] * 10, calibration)
    with pytest.raises(ValueError, match="each image's probabilities must sum to 1"):
        fit_calibration(np.full((3, 10), 0.2), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="labels are class numbers 0 to 9"):
        fit_calibration(np.full((3, 10), 0.1), np.array([0, 1, 10]))


def test_expected_agreement_weights_each_class_by_the_live_mix() -> None:
    stable = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    candidate = np.array([0, 0, 0, 3, 1, 2, 2, 2])
    # Per class stable predicts: 0 -> 3/4 agree, 1 -> 1/2, 2 -> 2/2; class 3 never predicted by stable.
    assert expected_agreement(stable, candidate, [1, 1, 1] + [0] * 7) == pytest.approx((0.75 + 0.5 + 1) / 3)
    assert expected_agreement(stable, candidate, [4, 0, 0] + [0] * 7) == pytest.approx(0.75)
    # Live answers in a class the held-out set never saw stable predict count as disagreement.
    assert expected_agreement(stable, candidate, [1, 0, 0, 1] + [0] * 6) == pytest.approx(0.375)
    assert expected_agreement(stable, stable, [1] * 10) == pytest.approx(0.3)  # classes 3-9 never predicted
    with pytest.raises(ValueError, match="two versions' predictions on the same images"):
        expected_agreement(stable, candidate[:-1], [1] * 10)
    with pytest.raises(ValueError, match="class numbers 0 to 9"):
        expected_agreement(stable, candidate + 7, [1] * 10)
    with pytest.raises(ValueError, match="count no images"):
        expected_agreement(stable, candidate, [0] * 10)


@pytest.mark.parametrize(("successes", "n"), [(0, 10), (10, 10), (3, 10), (81, 263), (950, 1000), (1, 20000)])
def test_wilson_bounds_are_scipys(successes: int, n: int) -> None:
    interval = binomtest(successes, n).proportion_ci(0.95, method="wilson")
    low, high = wilson_interval(successes, n, 1.959963984540054)
    assert (low, high) == pytest.approx((interval.low, interval.high), abs=1e-12)


def test_wilson_known_values_and_refusals() -> None:
    z = 1.96
    assert wilson_interval(0, 10, z) == pytest.approx((0.0, z * z / (10 + z * z)))  # 0.2775
    assert wilson_interval(10, 10, z) == pytest.approx((10 / (10 + z * z), 1.0))
    assert wilson_interval(0, 0, z) == (0.0, 1.0)
    for successes, n, bad_z in ((11, 10, z), (-1, 10, z), (1, 10, 0.0), (1, 10, float("nan")), (2.5, 10, z)):
        with pytest.raises(ValueError, match="a Wilson interval needs"):
            wilson_interval(successes, n, bad_z)


WINDOWS = 200  # undrifted live windows: the false-alarm rate's standard error is about 0.015 at alpha 0.05
WINDOW_IMAGES = 300
ALPHA = 0.05


def window_counts(rng: np.random.Generator, mix=UNSHIFTED, ease=EASE) -> tuple[np.ndarray, np.ndarray]:
    labels = labels_of(mix, WINDOW_IMAGES, rng)
    probabilities = answers(labels, rng, ease=ease)
    return probability_counts(probabilities), np.bincount(probabilities.argmax(axis=1), minlength=10)


def test_drift_tests_raise_few_false_alarms_on_undrifted_windows() -> None:
    """The reference is 10,000 images and a window 300: the tests' p-values are Monte Carlo, conditional on
    the margins, so their level holds at these sizes (the asymptotic chi-squared's did not)."""
    calibration, rng = fitted(6)
    softmax_alarms = mix_alarms = 0
    for _ in range(WINDOWS):
        probabilities, predicted = window_counts(rng)
        softmax_alarms += softmax_shift(calibration.reference_probabilities, probabilities, ALPHA).drifted
        mix_alarms += class_mix_shift(calibration.reference_predicted, predicted, ALPHA).drifted
    # Bonferroni holds the ten dimensions' family at alpha or below; the class mix is one test at alpha.
    assert softmax_alarms / WINDOWS <= ALPHA + 0.03
    assert 0.015 <= mix_alarms / WINDOWS <= ALPHA + 0.03


def test_drift_tests_detect_a_real_shift() -> None:
    calibration, rng = fitted(7)
    # Noisy images: the model grows unsure of every class (the softmax outputs move, the class mix barely).
    noisy = [
        softmax_shift(calibration.reference_probabilities, window_counts(rng, ease=EASE / 4)[0], ALPHA)
        for _ in range(20)
    ]
    assert all(test.drifted for test in noisy)
    assert all(len(test.p_values) == 10 and test.threshold == ALPHA / 10 for test in noisy)
    # Traffic rich in two classes: the predicted-class mix moves.
    rich = [
        class_mix_shift(calibration.reference_predicted, window_counts(rng, mix=RICH_IN_SWAPPED)[1], ALPHA)
        for _ in range(20)
    ]
    assert all(test.drifted for test in rich) and rich[0].threshold == ALPHA
    # An empty window is no evidence of anything.
    empty = softmax_shift(calibration.reference_probabilities, np.zeros((10, 20), dtype=np.int64), ALPHA)
    assert not empty.drifted and set(empty.p_values) == {1.0}
    with pytest.raises(ValueError, match="alpha is a false-alarm rate"):
        class_mix_shift(calibration.reference_predicted, [1] * 10, 1.5)


def test_drift_tests_take_counts_beyond_what_numpy_draws_without_replacement() -> None:
    """Months of windows summed, or a damaged count: a billion images and more are judged, not a numpy error."""
    calibration, rng = fitted(9)
    months = np.array(calibration.reference_predicted) * 10**6
    same = class_mix_shift(calibration.reference_predicted, months, ALPHA)
    assert not same.drifted and same.p_values[0] > 0.5
    assert class_mix_shift(
        calibration.reference_predicted, months + np.eye(10, dtype=np.int64)[8] * 10**9, ALPHA
    ).drifted
    huge = np.array(calibration.reference_probabilities) * 10**6
    assert not softmax_shift(huge, window_counts(rng)[0], ALPHA).drifted


def test_a_calibration_with_a_bad_field_is_refused_naming_it() -> None:
    good = fitted(8)[0].model_dump()
    assert Calibration.model_validate(good) == Calibration.model_validate_json(fitted(8)[0].model_dump_json())
    bad = {
        "atc_threshold": 1.5,
        "bin_accuracy": [0.5] * 99,
        "precision": [True] * 10,
        "images": 0,
        "reference_predicted": [10**30] * 10,
        "added": 1,
    }
    for field, value in bad.items():
        with pytest.raises(ValidationError, match=field):
            Calibration.model_validate({**good, field: value})
    broken = [[*good["reference_probabilities"][0][:-1], 5], *good["reference_probabilities"][1:]]
    with pytest.raises(ValidationError, match=r"reference_probabilities\[0\] adds up to"):
        Calibration.model_validate({**good, "reference_probabilities": broken})
