"""Evaluate stage, as a Prefect task: `fmnist.evaluation.evaluate`, with the per-class metrics, the confusion
matrix and a report with the plots as artifacts."""

from __future__ import annotations

import base64

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from fmnist.data.cache import CachedDataset
from fmnist.data.dataset import CLASS_NAMES
from fmnist.evaluation.evaluate import Evaluation, evaluate_model
from fmnist.storage import Store, StoredFile
from fmnist.storage.layout import RunLayout, StorageParams
from fmnist.training.fit import TrainResult
from fmnist.training.run_folder import RunFolder


def _embedded_png(store: Store, png: StoredFile, title: str) -> str:
    data = base64.b64encode(store.local_copy(png).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{data})"


def evaluation_markdown(evaluation: Evaluation, trained: TrainResult, store: Store) -> str:
    return "\n".join(
        [
            "# Evaluation on the fixed test set",
            "",
            "| metric | value |",
            "| --- | ---: |",
            f"| test accuracy | {evaluation.test_accuracy:.4f} |",
            f"| test loss | {evaluation.test_loss:.4f} |",
            f"| train accuracy | {evaluation.train_accuracy:.4f} |",
            f"| train-test gap | {evaluation.train_test_gap:+.4f} |",
            f"| epochs | {trained.epochs} ({trained.seconds_per_epoch:.2f} s each on {trained.device}) |",
            "",
            _embedded_png(store, evaluation.plots["learning_curves"], "Learning curves"),
            "",
            _embedded_png(store, evaluation.plots["confusion_matrix"], "Confusion matrix"),
            "",
            _embedded_png(store, evaluation.plots["sample_predictions"], "Sample predictions"),
            "",
            f"Files: `{trained.run.file(RunLayout.EVALUATION)}`",
        ]
    )


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
