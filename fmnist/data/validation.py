"""Validate stage: every input against the data contract (`fmnist.data.contract`), and each incoming batch
for drift from the canonical training data.

Each source (a canonical split, an incoming batch) is judged on its own and once: its outcomes, result
JSON and GX Data Docs (HTML) are kept in a folder of the data root keyed by its content and the
suites' source, so a run judges only the sources that are new to it, one at a time. A run's report,
keyed by all its inputs (published with `report.json` last), lists every outcome, so an unchanged
dataset is not even looked at again.
"""

from __future__ import annotations

import functools
import html
import json
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fmnist.data import drift, idx
from fmnist.data.contract import (
    DataValidationError,
    FrameCheck,
    SuiteOutcome,
    failure_message,
    incoming_check,
    kept_outcomes,
    raw_expectations,
    raw_summary,
    suite_version,
)
from fmnist.data.dataset import NUM_CLASSES, DatasetSpec
from fmnist.data.download import RawDataset, VerifiedFile
from fmnist.data.drift import DriftSetting
from fmnist.data.incoming import IncomingBatch, input_hashes, load_collected
from fmnist.storage import IntegrityError, Store, join
from fmnist.storage.files import sha256_text
from fmnist.storage.layout import OUTCOMES_FOLDER

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


@dataclass(frozen=True)
class Source:
    """One input the contract judges on its own: its suite's name, its content hash, how to read it."""

    suite: str
    content: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    rows: int | None = None  # what the contract requires of a canonical split (None: an incoming batch)
    batch: IncomingBatch | None = None


def sources(spec: DatasetSpec, raw: RawDataset, incoming: list[IncomingBatch], store: Store) -> list[Source]:
    def canonical(images: VerifiedFile, labels: VerifiedFile):
        return lambda: idx.read_pair(store.local_copy(images.file), store.local_copy(labels.file))

    return [
        Source(
            "raw-canonical-train",
            f"{raw.train_images.sha256}:{raw.train_labels.sha256}",
            canonical(raw.train_images, raw.train_labels),
            spec.train_rows,
        ),
        Source(
            "raw-canonical-test",
            f"{raw.test_images.sha256}:{raw.test_labels.sha256}",
            canonical(raw.test_images, raw.test_labels),
            spec.test_rows,
        ),
        *(Source(f"raw-incoming-{b.name}", b.sha256, lambda b=b: load_collected(store, b), batch=b) for b in incoming),
    ]


def contract_check(source: Source, images: np.ndarray, labels: np.ndarray) -> FrameCheck:
    if source.batch:
        return incoming_check(source.batch.name, images, labels)
    return FrameCheck(
        source.suite, raw_summary(images, labels), raw_expectations(source.rows, source.rows // NUM_CLASSES)
    )


def drift_check(suite: str, features: pd.DataFrame, reference: drift.DriftReference) -> FrameCheck:
    return FrameCheck(suite, features, drift.drift_expectations(reference), kind="drift")


def drifted_names(report: ValidationReport) -> list[str]:
    """What drifted, in words: each batch by name, and all the run's batches together."""
    return [
        f"the batches under {drift.MIN_ROWS} images, together"
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
    """Validate every input; reuse an earlier passing result for the same inputs and suites.

    Each source (a canonical split, an incoming batch) is judged on its own, once: its suites' outcomes
    are kept in `<validation>/sources/<key>/` (keyed by its content and the suites), with their result
    JSON and Data Docs, and a later run that has the same source reuses them. So a run reads only the
    sources no earlier run judged, one at a time. The run's report (`<validation>/<key>/report.json`)
    lists every suite's outcome and where its Data Docs are (`index.html` beside it links them all).
    """
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
    reference = _drift_reference(store, raw) if check_drift and incoming else None
    kept_in = join(validation_dir, OUTCOMES_FOLDER)
    outcomes = []
    for source in sources(spec, raw, incoming, store):
        load = functools.cache(source.load)  # read once, if both of its suites are judged now
        # Screening keeps a batch's contract outcome under this same key: a batch it judged is not judged again.
        outcomes += kept_outcomes(
            store,
            kept_in,
            (suite_version(), source.suite, source.content),
            lambda s=source, load=load: [contract_check(s, *load())],
        )
        if source.batch and reference and source.batch.rows >= drift.MIN_ROWS:
            # Judged against the canonical training data: its outcome depends on that data too.
            suite = f"{DRIFT_SUITE_PREFIX}{source.batch.name}"
            inputs = (drift.suite_version(), raw.train_images.sha256, raw.train_labels.sha256, suite, source.content)
            outcomes += kept_outcomes(
                store,
                kept_in,
                inputs,
                lambda suite=suite, load=load: [drift_check(suite, drift.image_features(*load()), reference())],
            )
        del load
    # Batches too small to judge alone are judged together: a drifted delivery split into such batches is
    # caught here. Batches big enough are judged alone only: a mixture of distributions that each pass
    # the KL divergence and median checks passes them too (KL divergence is convex; a median lies between
    # the medians of the parts), so judging them together again would find nothing new.
    small = [b for b in incoming if b.rows < drift.MIN_ROWS]
    if reference and len(small) > 1 and sum(b.rows for b in small) >= drift.MIN_ROWS:

        def small_batches_check() -> list[FrameCheck]:
            features = pd.concat([drift.image_features(*load_collected(store, b)) for b in small], ignore_index=True)
            return [drift_check(ALL_INCOMING_DRIFT_SUITE, features, reference())]

        inputs = (drift.suite_version(), raw.train_images.sha256, ALL_INCOMING_DRIFT_SUITE, *(b.sha256 for b in small))
        outcomes += kept_outcomes(store, kept_in, inputs, small_batches_check)
    report = ValidationReport(
        key=key,
        success=all(o.success for o in outcomes if o.kind == "contract"),
        result_path=join(out_dir, "report.json"),
        docs_index=join(out_dir, "index.html"),
        suites=outcomes,
    )
    with store.staged_tree(out_dir, marker="report.json") as staged:
        (staged / "index.html").write_text(_docs_index(report))
        (staged / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def _drift_reference(store: Store, raw: RawDataset) -> Callable[[], drift.DriftReference]:
    """The canonical training split's drift reference, computed the first time a batch is judged."""

    @functools.cache
    def reference() -> drift.DriftReference:
        images, labels = idx.read_pair(store.local_copy(raw.train_images.file), store.local_copy(raw.train_labels.file))
        return drift.reference(images, labels)

    return reference


def _docs_index(report: ValidationReport) -> str:
    """A page linking each suite's Data Docs (each source's are in its own folder)."""
    here = posixpath.dirname(report.docs_index)
    rows = "\n".join(
        f'<li><a href="{html.escape(posixpath.relpath(o.docs, here))}">{html.escape(o.suite)}</a>: '
        f"{'passed' if o.success else 'failed'} ({o.rows:,} rows)</li>"
        for o in report.suites
    )
    return f"<!doctype html>\n<title>Data validation {report.key[:16]}</title>\n<ul>\n{rows}\n</ul>\n"


def report_markdown(report: ValidationReport, drift_setting: DriftSetting) -> str:
    """The validation's markdown report in the Prefect UI: each suite's result, failures, and drift as set."""
    status = "passed" if report.success else "**FAILED**"
    lines = [
        f"# Data validation {status}",
        "",
        f"Key `{report.key[:16]}`{' (reused: same inputs, same suites)' if report.reused else ''}.",
        "",
        "| suite | rows | expectations | result |",
        "| --- | ---: | ---: | --- |",
    ]
    lines += [
        f"| {o.suite} | {o.rows:,} | {o.evaluated} | {'passed' if o.success else f'{len(o.failures)} failed'} |"
        for o in report.suites
        if o.kind == "contract" or drift_setting != "off"
    ]
    failures = [f"- `{o.suite}`: {f}" for o in report.suites if o.kind == "contract" for f in o.failures]
    if failures:
        lines += ["", "## Failed expectations", "", *failures]
    if report.drifted and drift_setting != "off":
        lines += [
            "",
            f"## Drift ({'stops the run' if drift_setting == 'fail' else 'a warning'}: drift={drift_setting})",
            "",
            f"Batches unlike the canonical training data (KL divergence limit {drift.KL_THRESHOLD}; median "
            "within the training interquartile range):",
            "",
            *[f"- `{o.suite}`: {f}" for o in report.drifted for f in o.failures],
        ]
    lines += ["", f"Result JSON: `{report.result_path}`", "", f"Data Docs: `{report.docs_index}`"]
    return "\n".join(lines)
