"""The evaluation's markdown report in the Prefect UI: the metrics, and the plots embedded as PNG data."""

from __future__ import annotations

import base64

from fmnist.evaluation.evaluate import Evaluation
from fmnist.storage import Store, StoredFile
from fmnist.storage.layout import RunLayout
from fmnist.training.fit import TrainResult


def embedded_png(store: Store, png: StoredFile, title: str) -> str:
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
            embedded_png(store, evaluation.plots["learning_curves"], "Learning curves"),
            "",
            embedded_png(store, evaluation.plots["confusion_matrix"], "Confusion matrix"),
            "",
            embedded_png(store, evaluation.plots["sample_predictions"], "Sample predictions"),
            "",
            f"Files: `{trained.run.file(RunLayout.EVALUATION)}`",
        ]
    )
