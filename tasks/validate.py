"""Validate stage, as a Prefect task: the contract and drift checks (`fmnist.data.validation`), their report
as an artifact, and the events that tell the operator about a failure or drift."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from fmnist.data.contract import failure_lines
from fmnist.data.dataset import DatasetSpec
from fmnist.data.download import RawDataset
from fmnist.data.drift import DriftSetting
from fmnist.data.incoming import IncomingBatch
from fmnist.data.validation import ValidationReport, drift_verdict, report_markdown, validate_raw
from fmnist.ops import events
from fmnist.storage.layout import StorageParams


@task(name="validate")
def validate_task(
    spec: DatasetSpec,
    raw: RawDataset,
    incoming: list[IncomingBatch],
    storage: StorageParams,
    drift_setting: DriftSetting = "warn",
) -> ValidationReport:
    logger = get_run_logger()
    report = validate_raw(
        spec, raw, incoming, storage.store(), storage.data.validation, check_drift=drift_setting != "off"
    )
    create_markdown_artifact(
        key="data-validation",
        markdown=report_markdown(report, drift_setting),
        description="great-expectations results",
    )
    logger.info(
        "Validation %s%s: %s",
        "passed" if report.success else "FAILED",
        " (reused)" if report.reused else "",
        report.docs_index,
    )
    if not report.success:
        failures = failure_lines(report.suites)
        events.emit(
            events.VALIDATION_FAILED,
            storage.registry,
            f"Data validation failed: {'; '.join(failures)}",
            failures=failures[:20],
        )
    report.raise_for_failure()
    verdict = drift_verdict(report, drift_setting)
    if verdict.message:
        events.emit(events.DRIFT_DETECTED, storage.registry, verdict.message, batches=[o.suite for o in report.drifted])
        verdict.raise_if_stopping(report.docs_index)
        logger.warning("%s (drift=warn: training on them anyway)", verdict.message)
    return report
