"""Evaluate stage, as a Prefect task: `fmnist.evaluation.evaluate`, with the per-class metrics, the confusion
matrix and a report with the plots as artifacts."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fmnist.data.cache import CachedDataset
from fmnist.data.dataset import CLASS_NAMES
from fmnist.evaluation.evaluate import Evaluation, evaluate_model
from fmnist.evaluation.report import evaluation_markdown
from fmnist.storage.layout import StorageParams
from fmnist.training.fit import TrainResult
from fmnist.training.run_folder import RunFolder


@task(name="evaluate")
def evaluate_task(trained: TrainResult, cached: CachedDataset, storage: StorageParams) -> Evaluation:
    run = RunFolder(storage.store(), trained.run)
    evaluation = evaluate_model(trained, cached, run)
    create_table_artifact(
        key="per-class-metrics",
        table=[{**row, **{k: round(row[k], 4) for k in ("precision", "recall", "f1")}} for row in evaluation.per_class],
        description="Precision, recall and F1 of each class on the test set",
    )
    create_table_artifact(
        key="confusion-matrix",
        table=[
            {"true": CLASS_NAMES[i], **{name: count for name, count in zip(CLASS_NAMES, row, strict=True)}}
            for i, row in enumerate(evaluation.confusion_matrix)
        ],
        description="Test set: rows are the true class, columns the predicted class",
    )
    create_markdown_artifact(
        key="evaluation-report",
        markdown=evaluation_markdown(evaluation, trained, run.store),
        description="Metrics and plots",
    )
    get_run_logger().info(
        "Test accuracy %.4f, loss %.4f; train-test gap %+.4f",
        evaluation.test_accuracy,
        evaluation.test_loss,
        evaluation.train_test_gap,
    )
    return evaluation
