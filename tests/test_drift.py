"""Drift: incoming batches unlike the training data are flagged with numbers; a sample of it is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fmnist.data import drift
from fmnist.data.dataset import DatasetSpec
from fmnist.data.incoming import collect_incoming
from fmnist.data.validation import DriftError, drift_verdict, report_markdown, validate_raw
from tests.helpers import balanced_labels, synthetic_images, write_idx_batch, write_mirror


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetSpec]:
    """Enough training rows (1,000) for the reference deciles to mean something."""
    folder = tmp_path_factory.mktemp("mirror")
    return folder, write_mirror(folder, train_per_class=100, test_per_class=5)


def validate_batches(spec, raw, layout, store, incoming: Path, check_drift: bool = True):
    return validate_raw(spec, raw, collect_incoming(store, str(incoming)), store, layout.validation, check_drift)


def test_drifted_batches_are_flagged_with_numbers_and_a_like_batch_is_not(mirror, raw, layout, store, tmp_path):
    _, spec = mirror
    incoming = tmp_path / "incoming"
    like = balanced_labels(10, seed=7)  # the training distribution, other images (another seed)
    write_idx_batch(incoming / "like-training", synthetic_images(like, seed=7), like)
    write_idx_batch(incoming / "inverted", 255 - synthetic_images(like, seed=8), like)
    one_class = np.full(100, 4, dtype=np.uint8)
    write_idx_batch(incoming / "one-class", synthetic_images(one_class, seed=9), one_class)
    tiny = np.full(drift.MIN_ROWS - 1, 4, dtype=np.uint8)
    write_idx_batch(incoming / "tiny", synthetic_images(tiny, seed=10), tiny)

    report = validate_batches(spec, raw, layout, store, incoming)
    assert report.success, "drift is not a contract failure"
    report.raise_for_failure()
    assert sorted(o.suite for o in report.drifted) == ["drift-incoming-inverted", "drift-incoming-one-class"]
    drift_suites = {o.suite for o in report.suites if o.kind == "drift"}
    # Batches big enough are judged alone only (a mixture of passing batches passes); the one batch too
    # small has no other small batch to be judged with.
    assert "drift-all-incoming" not in drift_suites
    assert "drift-incoming-tiny" not in drift_suites, "too small to judge"
    by_suite = {o.suite: o for o in report.suites}
    inverted = " ".join(by_suite["drift-incoming-inverted"].failures)
    assert "column=mean_intensity" in inverted and "observed" in inverted
    [label_kl] = [f for f in by_suite["drift-incoming-one-class"].failures if "column=label" in f]
    assert float(label_kl.rsplit("observed ", 1)[1]) == pytest.approx(np.log(10), abs=1e-6)
    markdown = report_markdown(report, "warn")
    assert "## Drift (a warning: drift=warn)" in markdown and "drift-incoming-one-class" in markdown
    assert "Drift" not in report_markdown(report, "off")


def test_the_drift_policy_tells_and_trains_tells_and_stops_or_says_nothing(mirror, raw, layout, store, tmp_path):
    _, spec = mirror
    labels = np.full(100, 4, dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "one-class", synthetic_images(labels, seed=9), labels)
    drifted = validate_batches(spec, raw, layout, store, tmp_path / "incoming")
    warn, fail, off = (drift_verdict(drifted, setting) for setting in ("warn", "fail", "off"))
    assert warn.message and warn.message.startswith("Incoming data unlike the training data: batch one-class. ")
    assert fail.message == warn.message and fail.stop and not warn.stop
    assert off.message is None and not off.stop
    warn.raise_if_stopping("docs")  # a warning does not stop the run
    with pytest.raises(DriftError, match=r"batch one-class\. .*\nSet drift to 'warn' to train on them anyway"):
        fail.raise_if_stopping("docs")
    (tmp_path / "incoming" / "one-class").rename(tmp_path / "nothing-here")
    quiet = validate_batches(spec, raw, layout, store, tmp_path / "incoming")
    assert drift_verdict(quiet, "fail") == drift_verdict(quiet, "warn") == off  # nothing drifted: nothing to say


def test_drift_off_checks_nothing(mirror, raw, layout, store, tmp_path):
    _, spec = mirror
    labels = np.full(100, 4, dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "one-class", synthetic_images(labels, seed=9), labels)
    report = validate_batches(spec, raw, layout, store, tmp_path / "incoming", check_drift=False)
    assert report.success and not [o for o in report.suites if o.kind == "drift"]


def test_a_drifted_delivery_split_into_batches_too_small_to_judge_is_judged_as_a_whole(
    mirror, raw, layout, store, tmp_path
):
    """147 inverted images of one class passed unflagged as three batches of 49 (each under MIN_ROWS)."""
    _, spec = mirror
    incoming = tmp_path / "incoming"
    labels = np.full(drift.MIN_ROWS - 1, 2, dtype=np.uint8)
    for part in range(3):
        write_idx_batch(incoming / f"part-{part}", 255 - synthetic_images(labels, seed=20 + part), labels)
    report = validate_batches(spec, raw, layout, store, incoming)
    assert [o.suite for o in report.drifted] == ["drift-all-incoming"]
    assert not [o for o in report.suites if o.suite.startswith("drift-incoming-")], "each alone is too small"
    assert f"the batches under {drift.MIN_ROWS} images, together" in drift_verdict(report, "warn").message


def test_one_batch_is_not_judged_twice(mirror, raw, layout, store, tmp_path):
    _, spec = mirror
    labels = np.full(100, 4, dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "one-class", synthetic_images(labels, seed=9), labels)
    report = validate_batches(spec, raw, layout, store, tmp_path / "incoming")
    assert [o.suite for o in report.suites if o.kind == "drift"] == ["drift-incoming-one-class"]
