"""Validate stage: every input against the data contract (`fmnist.contract`), as a Prefect task.

Results are kept as JSON and as GX Data Docs (HTML) in a folder of the data root keyed by the
inputs' content hashes and the contract's source (published with `report.json` last), so an
unchanged dataset is not validated twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fmnist import idx
from fmnist.contract import (
    DataValidationError,
    FrameCheck,
    SuiteOutcome,
    raw_expectations,
    raw_summary,
    run_checks,
    suite_version,
)
from fmnist.dataset import NUM_CLASSES, DatasetSpec
from fmnist.files import sha256_text
from fmnist.incoming import IncomingBatch, load_collected
from fmnist.layout import StorageParams
from fmnist.storage import IntegrityError, Store, join
from tasks.download import RawDataset
from tasks.incoming import input_hashes


@dataclass(frozen=True)
class ValidationReport:
    key: str
    success: bool
    result_path: str  # locations in the data root
    docs_index: str
    suites: list[SuiteOutcome]
    reused: bool = False

    def raise_for_failure(self) -> None:
        if self.success:
            return
        lines = [f"{o.suite}: {f}" for o in self.suites for f in o.failures]
        raise DataValidationError(
            "Data validation failed:\n  - "
            + "\n  - ".join(lines)
            + f"\nFull result: {self.result_path}\nData Docs: {self.docs_index}"
        )


def raw_checks(spec: DatasetSpec, raw: RawDataset, incoming: list[IncomingBatch], store: Store) -> list[FrameCheck]:
    """A suite for each canonical split and each incoming batch."""
    rows = {"train": spec.train_rows, "test": spec.test_rows}
    pairs = {"train": (raw.train_images, raw.train_labels), "test": (raw.test_images, raw.test_labels)}
    checks = []
    for split, (images_file, labels_file) in pairs.items():
        images, labels = idx.read_pair(store.local_copy(images_file.file), store.local_copy(labels_file.file))
        checks.append(
            FrameCheck(
                f"raw-canonical-{split}",
                raw_summary(images, labels),
                raw_expectations(rows[split], rows[split] // NUM_CLASSES),
            )
        )
    for batch in incoming:
        images, labels = load_collected(store, batch)
        checks.append(
            FrameCheck(f"raw-incoming-{batch.name}", raw_summary(images, labels), raw_expectations(None, None))
        )
    return checks


def validate_raw(
    spec: DatasetSpec, raw: RawDataset, incoming: list[IncomingBatch], store: Store, validation_dir: str
) -> ValidationReport:
    """Validate every input; reuse an earlier passing result for the same inputs and suites."""
    key = sha256_text("raw-validation", suite_version(), *input_hashes(raw, incoming))
    out_dir = join(validation_dir, key)
    try:
        report = store.read_json(join(out_dir, "report.json"))
        if report["success"]:
            report["suites"] = [SuiteOutcome(**s) for s in report["suites"]]
            return ValidationReport(**{**report, "reused": True})
    except (FileNotFoundError, IntegrityError, KeyError, TypeError):
        pass  # none yet, or unreadable: validate again
    with store.staged_tree(out_dir, marker="report.json") as staged:
        outcomes = run_checks(raw_checks(spec, raw, incoming, store), staged)
        report = ValidationReport(
            key=key,
            success=all(o.success for o in outcomes),
            result_path=join(out_dir, "result.json"),
            docs_index=join(out_dir, "docs", "index.html"),
            suites=outcomes,
        )
        (staged / "report.json").write_text(json.dumps(asdict(report), indent=1))
    return report


def report_markdown(report: ValidationReport) -> str:
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
    ]
    failures = [f"- `{o.suite}`: {f}" for o in report.suites for f in o.failures]
    if failures:
        lines += ["", "## Failed expectations", "", *failures]
    lines += ["", f"Result JSON: `{report.result_path}`", "", f"Data Docs: `{report.docs_index}`"]
    return "\n".join(lines)


@task(name="validate")
def validate_task(
    spec: DatasetSpec, raw: RawDataset, incoming: list[IncomingBatch], storage: StorageParams
) -> ValidationReport:
    report = validate_raw(spec, raw, incoming, storage.store(), storage.data.validation)
    create_markdown_artifact(
        key="data-validation", markdown=report_markdown(report), description="great-expectations results"
    )
    get_run_logger().info(
        "Validation %s%s: %s",
        "passed" if report.success else "FAILED",
        " (reused)" if report.reused else "",
        report.docs_index,
    )
    report.raise_for_failure()
    return report
