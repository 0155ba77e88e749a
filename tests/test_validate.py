"""The GX suites on small generated data: green data passes, each broken contract is reported."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import contract
from fmnist.data.contract import (
    DataValidationError,
    FrameCheck,
    normalized_expectations,
    normalized_summary,
    run_checks,
)
from fmnist.data.download import VerifiedFile, download_dataset
from fmnist.data.incoming import collect_incoming
from fmnist.data.validation import validate_raw
from fmnist.storage import Store
from fmnist.storage.layout import DataLayout
from tests.helpers import synthetic_images, write_idx_batch


def test_valid_data_passes_and_keeps_json_and_data_docs(mirror, layout, store, raw) -> None:
    _, spec = mirror
    report = validate_raw(spec, raw, [], store, layout.validation)
    assert report.success and not report.reused
    assert [(s.suite, s.rows, s.success) for s in report.suites] == [
        ("raw-canonical-train", 200, True),
        ("raw-canonical-test", 50, True),
    ]
    result = json.loads(Path(report.result_path).read_text())
    assert result["success"] is True
    assert [s["suite"] for s in result["suites"]] == ["raw-canonical-train", "raw-canonical-test"]
    # The run's index links each source's own Data Docs, which show its suite's validation.
    index = Path(report.docs_index)
    links = re.findall(r'href="([^"]+)"', index.read_text())
    assert len(links) == 2
    for link, suite in zip(links, ("raw-canonical-train", "raw-canonical-test"), strict=True):
        docs = (index.parent / link).resolve()
        assert docs.is_file() and suite in "".join(
            p.read_text() for p in docs.parent.rglob("*.html") if "validations" in str(p)
        )
    report.raise_for_failure()  # no error for a passing report


def judged_suites(monkeypatch) -> list[str]:
    """The suites GX runs from now on, in order."""
    judged: list[str] = []
    real_run_checks = contract.run_checks

    def counting(checks, out_dir):
        judged.extend(check.suite for check in checks)
        return real_run_checks(checks, out_dir)

    monkeypatch.setattr(contract, "run_checks", counting)
    return judged


def test_a_new_batch_is_the_only_source_judged_again(mirror, layout, store, raw, tmp_path, monkeypatch) -> None:
    _, spec = mirror
    labels = np.array([1, 2, 3], dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "first", synthetic_images(labels, seed=5), labels)
    validate_raw(spec, raw, collect_incoming(store, str(tmp_path / "incoming")), store, layout.validation)
    write_idx_batch(tmp_path / "incoming" / "second", synthetic_images(labels, seed=6), labels)
    judged = judged_suites(monkeypatch)
    report = validate_raw(spec, raw, collect_incoming(store, str(tmp_path / "incoming")), store, layout.validation)
    assert report.success and not report.reused
    assert judged == ["raw-incoming-second"]
    assert [o.suite for o in report.suites] == [
        "raw-canonical-train",
        "raw-canonical-test",
        "raw-incoming-first",
        "raw-incoming-second",
    ]


def test_passing_result_is_reused_for_the_same_inputs(mirror, layout, store, raw) -> None:
    _, spec = mirror
    first = validate_raw(spec, raw, [], store, layout.validation)
    second = validate_raw(spec, raw, [], store, layout.validation)
    assert second.reused and second.key == first.key and second.suites == first.suites


def test_label_out_of_range_in_incoming_batch(mirror, layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    labels = np.array([1, 10, 2, 10], dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "new-shoes", synthetic_images(labels % 10, seed=5), labels)
    report = validate_raw(spec, raw, collect_incoming(store, str(tmp_path / "incoming")), store, layout.validation)
    assert not report.success
    by_suite = {s.suite: s for s in report.suites}
    assert by_suite["raw-canonical-train"].success
    [failure] = by_suite["raw-incoming-new-shoes"].failures
    assert "expect_column_values_to_be_between(column=label, min_value=0.0, max_value=9.0)" in failure
    assert "2 of 4 rows unexpected; e.g. row=1 label=10, row=3 label=10" in failure
    with pytest.raises(DataValidationError) as caught:
        report.raise_for_failure()
    assert "raw-incoming-new-shoes: expect_column_values_to_be_between(column=label" in str(caught.value)
    assert report.docs_index in str(caught.value)
    assert json.loads(Path(report.result_path).read_text())["success"] is False


def test_images_that_are_not_28x28(mirror, layout, store, raw, tmp_path) -> None:
    _, spec = mirror
    labels = np.array([0, 1], dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "big", np.zeros((2, 30, 30), np.uint8), labels)
    report = validate_raw(spec, raw, collect_incoming(store, str(tmp_path / "incoming")), store, layout.validation)
    failures = {s.suite: s.failures for s in report.suites}["raw-incoming-big"]
    assert len(failures) == 2
    assert any("column=height, value_set=[28]): 2 of 2 rows unexpected" in f for f in failures)
    assert any("column=width" in f for f in failures)


def test_canonical_row_counts_and_balance_are_checked(mirror, layout, store, raw) -> None:
    _, spec = mirror
    wrong = spec.model_copy(update={"train_rows": 210})
    report = validate_raw(wrong, raw, [], store, layout.validation)
    failures = {s.suite: s.failures for s in report.suites}["raw-canonical-train"]
    assert any(f.startswith("expect_table_row_count_to_equal(value=210): observed 200") for f in failures)
    # 210 rows would mean 21 per class; each class has 20.
    assert any("column=label_count, min_value=21.0, max_value=21.0): 200 of 200 rows" in f for f in failures)


def test_missing_class_is_reported(layout, store, tmp_path) -> None:
    from tests.helpers import write_mirror

    spec = write_mirror(tmp_path / "m", train_per_class=2, test_per_class=1)
    raw = download_dataset(spec, [str(tmp_path / "m")], store, layout.raw)
    labels_path = Path(raw.test_labels.path)
    data = bytearray(labels_path.read_bytes())
    data[8:] = bytes(b if b != 7 else 3 for b in data[8:])  # no Sneaker left in the test split
    labels_path.write_bytes(bytes(data))
    pinned = VerifiedFile(raw.test_labels.path, hashlib.sha256(data).hexdigest(), "test")
    raw = dataclasses.replace(raw, test_labels=pinned)
    report = validate_raw(spec, raw, [], store, layout.validation)
    failures = {s.suite: s.failures for s in report.suites}["raw-canonical-test"]
    assert any("expect_column_distinct_values_to_contain_set" in f and "missing [7]" in f for f in failures)


def test_normalized_suite_catches_nan_and_out_of_range(tmp_path) -> None:
    pixels = np.full((4, 784), 0.5, dtype=np.float32)
    pixels[1, 10] = np.nan
    pixels[2, 0] = 1.5
    pixels[3, 5] = -0.25
    labels = np.array([0, 1, 2, 3], dtype=np.uint8)
    [outcome] = run_checks(
        [FrameCheck("normalized-train", normalized_summary(pixels, labels), normalized_expectations(4))], tmp_path
    )
    assert not outcome.success
    text = "\n".join(outcome.failures)
    assert "column=nan_count, min_value=0.0, max_value=0.0): 1 of 4 rows unexpected; e.g. row=1 nan_count=1" in text
    assert "column=pixel_max, min_value=0.0, max_value=1.0): 1 of 4 rows unexpected; e.g. row=2 pixel_max=1.5" in text
    assert "column=pixel_min, min_value=0.0, max_value=1.0): 1 of 4 rows unexpected; e.g. row=3 pixel_min=-0.25" in text


def test_normalized_summary_leaves_nans_out_of_each_images_range() -> None:
    pixels = np.full((4, 784), 0.5, dtype=np.float32)
    pixels[0, :3] = [np.nan, 0.0, 1.0]
    pixels[1] = np.nan  # nothing but NaN: no range at all
    pixels[2, 7] = np.inf
    summary = normalized_summary(pixels, np.array([4, 3, 2, 1], dtype=np.uint8))
    assert summary["pixel_min"].tolist() == [0.0, np.inf, 0.5, 0.5]
    assert summary["pixel_max"].tolist() == [1.0, -np.inf, np.inf, 0.5]
    assert summary["nan_count"].tolist() == [1, 784, 0, 0]
    assert summary["label"].tolist() == [4, 3, 2, 1] and summary["row"].tolist() == [0, 1, 2, 3]


def test_results_in_a_bucket_are_published_whole_and_reused(mirror, store: Store, bucket: str, tmp_path) -> None:
    folder, spec = mirror
    layout = DataLayout(f"{bucket}/data")
    raw = download_dataset(spec, [str(folder)], store, layout.raw)
    first = validate_raw(spec, raw, [], store, layout.validation)
    assert first.result_path == f"{bucket}/data/validation/{first.key}/report.json"
    assert store.read_json(first.result_path)["success"] is True
    assert store.exists(first.docs_index)
    assert store.read_json(f"{bucket}/data/validation/{first.key}/report.json")["key"] == first.key
    # Another host, sharing only the bucket, reuses the result.
    again = validate_raw(spec, raw, [], Store(scratch=tmp_path / "other-host"), layout.validation)
    assert again.reused and again.suites == first.suites


def test_a_batch_screening_judged_is_not_judged_again_by_validation(mirror, layout, store, raw, tmp_path, monkeypatch):
    from fmnist.data.incoming import known_images, screen_incoming

    _, spec = mirror
    labels = np.array([1, 2, 3], dtype=np.uint8)
    write_idx_batch(tmp_path / "incoming" / "screened", synthetic_images(labels, seed=5), labels)
    known = known_images(store, raw.test_images.file, raw.train_images.file)
    screening = screen_incoming(store, str(tmp_path / "incoming"), known, outcomes=layout.outcomes)
    judged = judged_suites(monkeypatch)
    report = validate_raw(spec, raw, screening.batches, store, layout.validation)
    assert report.success and "raw-incoming-screened" in [o.suite for o in report.suites]
    assert judged == ["raw-canonical-train", "raw-canonical-test"]


def test_data_docs_templates_are_compiled_once_per_process_and_the_pages_are_the_same(tmp_path, monkeypatch) -> None:
    """GX makes a new jinja2 environment for each Data Docs page kind at every build; the templates it
    compiled once are reused (`fmnist.data.gx_templates`), and a build from them writes the same pages."""
    import jinja2

    compiled: list[str] = []
    real_compile = jinja2.Environment.compile

    def counting(environment, source, name=None, *args, **kwargs):
        compiled.append(name)
        return real_compile(environment, source, name, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "compile", counting)
    pixels = np.full((3, 784), 0.5, dtype=np.float32)
    labels = np.array([0, 1, 2], dtype=np.uint8)

    def build(folder: str) -> dict[str, str]:
        check = FrameCheck("normalized-train", normalized_summary(pixels, labels), normalized_expectations(3))
        [outcome] = run_checks([check], tmp_path / folder)
        assert outcome.success

        # Each build stamps its run's time and ids into the pages and their paths: compared without them.
        def unstamped(text: str) -> str:
            return re.sub(r"\d{8}T\d{6}\.\d+Z|[0-9a-f]{32}|\d{4}-\d\d-\d\d[T ][\d:.]+|\d{10}\.\d+", "#", text)

        pages = (tmp_path / folder).rglob("*.html")
        return {unstamped(str(p.relative_to(tmp_path / folder))): unstamped(p.read_text()) for p in pages}

    first = build("first")  # compiles what this process had not compiled yet
    compiled.clear()
    second = build("second")
    assert compiled == [], compiled
    assert first and first.keys() == second.keys()
    assert first == second
