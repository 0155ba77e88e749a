"""Validate stage: every input against the data contract (`fmnist.data.contract`), and each incoming batch
for drift from the canonical training data.

Results are kept as JSON and as GX Data Docs (HTML) in a folder of the data root keyed by the
inputs' content hashes and the contract's source (published with `report.json` last), so an
unchanged dataset is not validated twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pandas as pd

from fmnist.data import drift, idx
from fmnist.data.contract import (
    DataValidationError,
    FrameCheck,
    SuiteOutcome,
    failure_message,
    incoming_check,
    raw_expectations,
    raw_summary,
    run_checks,
    suite_version,
)
from fmnist.data.dataset import NUM_CLASSES, DatasetSpec
from fmnist.data.download import RawDataset
from fmnist.data.drift import DriftSetting
from fmnist.data.incoming import IncomingBatch, input_hashes, load_collected
from fmnist.storage import IntegrityError, Store, join
from fmnist.storage.files import sha256_text

DRIFT_SUITE_PREFIX = "drift-incoming-"  # then the batch's name
ALL_INCOMING_DRIFT_SUITE = "drift-all-incoming"  # no batch's suite: a batch name starts with a letter or digit


class DriftError(DataValidationError):
    """Incoming batches unlike the training data, and the run was told to stop on drift."""


@dataclass(frozen=True)
class ValidationReport:
    key: str
    success: bool
    result_path: str  # locations in the data root
    docs_index: str
    suites: list[SuiteOutcome]
    reused: bool = False

    @property
    def drifted(self) -> list[SuiteOutcome]:
        """The incoming batches' drift suites that failed: batches unlike the training data."""
        return [o for o in self.suites if o.kind == "drift" and not o.success]

    def raise_for_failure(self) -> None:
        if self.success:
            return
        raise DataValidationError(
            f"{failure_message(self.suites)}\nFull result: {self.result_path}\nData Docs: {self.docs_index}"
        )


def raw_checks(
    spec: DatasetSpec, raw: RawDataset, incoming: list[IncomingBatch], store: Store, check_drift: bool
) -> list[FrameCheck]:
    """A contract suite for each canonical split and each incoming batch; a drift suite for each batch
    big enough to judge."""
    rows = {"train": spec.train_rows, "test": spec.test_rows}
    pairs = {"train": (raw.train_images, raw.train_labels), "test": (raw.test_images, raw.test_labels)}
    checks, reference = [], None
    for split, (images_file, labels_file) in pairs.items():
        images, labels = idx.read_pair(store.local_copy(images_file.file), store.local_copy(labels_file.file))
        if split == "train" and check_drift and incoming:
            reference = drift.reference(images, labels)
        checks.append(
            FrameCheck(
                f"raw-canonical-{split}",
                raw_summary(images, labels),
                raw_expectations(rows[split], rows[split] // NUM_CLASSES),
            )
        )
    features = []
    for batch in incoming:
        images, labels = load_collected(store, batch)
        checks.append(incoming_check(batch.name, images, labels))
        if reference is not None:
            features.append(drift.image_features(images, labels))
            if batch.rows >= drift.MIN_ROWS:
                checks.append(drift_check(f"{DRIFT_SUITE_PREFIX}{batch.name}", features[-1], reference))
    # What the run adds in all, too: a drifted delivery split into batches too small to judge is judged here.
    if len(features) > 1 and sum(len(f) for f in features) >= drift.MIN_ROWS:
        checks.append(drift_check(ALL_INCOMING_DRIFT_SUITE, pd.concat(features, ignore_index=True), reference))
    return checks


def drift_check(suite: str, features: pd.DataFrame, reference: drift.DriftReference) -> FrameCheck:
    return FrameCheck(suite, features, drift.drift_expectations(reference), kind="drift")


def drifted_names(report: ValidationReport) -> list[str]:
    """What drifted, in words: each batch by name, and all the run's batches together."""
    return [
        "all incoming batches together"
        if o.suite == ALL_INCOMING_DRIFT_SUITE
        else f"batch {o.suite.removeprefix(DRIFT_SUITE_PREFIX)}"
        for o in report.drifted
    ]


@dataclass(frozen=True)
class DriftVerdict:
    """What a run does about drift: tell the operator `message` (None: nothing to tell), and stop if `stop`."""

    message: str | None
    stop: bool

    def raise_if_stopping(self, docs_index: str) -> None:
        if self.stop:
            raise DriftError(f"{self.message}\nSet drift to 'warn' to train on them anyway. Data Docs: {docs_index}")


def drift_verdict(report: ValidationReport, setting: DriftSetting) -> DriftVerdict:
    """The drift policy: `off` says nothing, `warn` tells and trains on the batches, `fail` tells and stops."""
    if setting == "off" or not report.drifted:
        return DriftVerdict(None, stop=False)
    details = "; ".join(f for o in report.drifted for f in o.failures)
    message = f"Incoming data unlike the training data: {', '.join(drifted_names(report))}. {details}"
    return DriftVerdict(message, stop=setting == "fail")


def validate_raw(
    spec: DatasetSpec,
    raw: RawDataset,
    incoming: list[IncomingBatch],
    store: Store,
    validation_dir: str,
    check_drift: bool = True,
) -> ValidationReport:
    """Validate every input; reuse an earlier passing result for the same inputs and suites."""
    suites = (suite_version(), drift.suite_version()) if check_drift else (suite_version(), "no-drift")
    key = sha256_text("raw-validation", *suites, *input_hashes(raw, incoming))
    out_dir = join(validation_dir, key)
    try:
        report = store.read_json(join(out_dir, "report.json"))
        if report["success"]:
            report["suites"] = [SuiteOutcome(**s) for s in report["suites"]]
            return ValidationReport(**{**report, "reused": True})
    except (FileNotFoundError, IntegrityError, KeyError, TypeError):
        pass  # none yet, or unreadable: validate again
    with store.staged_tree(out_dir, marker="report.json") as staged:
        outcomes = run_checks(raw_checks(spec, raw, incoming, store, check_drift), staged)
        report = ValidationReport(
            key=key,
            success=all(o.success for o in outcomes if o.kind == "contract"),
            result_path=join(out_dir, "result.json"),
            docs_index=join(out_dir, "docs", "index.html"),
            suites=outcomes,
        )
        (staged / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report
