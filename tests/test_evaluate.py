"""Evaluation: metrics against a hand-computed example, files and plots, a refused damaged model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist.data.cache import normalize
from fmnist.data.download import RawDataset, VerifiedFile
from fmnist.evaluation.evaluate import (
    PREDICT_ROWS,
    confusion_matrix,
    evaluate_model,
    per_class_metrics,
    predicted_probabilities,
)
from fmnist.evaluation.report import evaluation_markdown
from fmnist.registry.gate import PromotionParams
from fmnist.registry.manifest import Decision, VersionManifest, build_manifest, model_card
from fmnist.registry.predictions import read_test_predictions
from fmnist.registry.registration import register_model
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import IntegrityError, StoredFile
from fmnist.training.export import ExportError, check_export, export_saved_model
from fmnist.training.fit import train_model
from fmnist.training.model import TrainParams, load_verified_model
from tests.helpers import learnable_cache, local_run, run_manifest, synthetic_images

pytestmark = pytest.mark.training


def test_metrics_match_a_hand_computed_example() -> None:
    true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0])
    matrix = confusion_matrix(true, predicted, classes=3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    metrics = per_class_metrics(matrix)
    # class 0: precision 2/3 (of 3 predicted 0), recall 2/3 (of 3 true 0)
    # class 1: precision 1/2, recall 1/2; class 2: precision 3/4, recall 3/4
    expected = [(2 / 3, 2 / 3), (1 / 2, 1 / 2), (3 / 4, 3 / 4)]
    for row, (precision, recall) in zip(metrics, expected, strict=True):
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert [row["support"] for row in metrics] == [3, 2, 4]
    assert metrics[0]["class"] == "T-shirt/top"


def test_class_never_predicted_has_zero_precision_not_nan() -> None:
    metrics = per_class_metrics(confusion_matrix(np.array([0, 1]), np.array([0, 0]), classes=2))
    assert metrics[1] == {"class": "Trouser", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval")
    cached = learnable_cache(root / "cache")
    return cached, train_model(cached, TrainParams(epochs=2, seed=3), local_run(root / "run"))


def test_evaluation_writes_metrics_and_plots(trained, tmp_path: Path) -> None:
    cached, result = trained
    run = local_run(Path(result.run.location))
    evaluation = evaluate_model(result, cached, run)
    assert evaluation.model_sha256 == result.model.sha256

    # Registration keeps only the model these numbers are about.
    other_model = dataclasses.replace(result, model=StoredFile(result.history.location, result.history.sha256))
    registry = Registry(run.store, str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match=r"but the evaluation is of the model \w+: not registering a model whose"):
        register_model(registry, other_model, evaluation, run_manifest(0.9), PromotionParams(min_accuracy=0.5))
    assert registry.versions() == [] and not (tmp_path / "registry").exists()
    matrix = np.array(evaluation.confusion_matrix)
    assert matrix.sum() == cached.test.rows
    assert evaluation.test_accuracy == pytest.approx(np.trace(matrix) / matrix.sum(), abs=1e-6)
    assert evaluation.test_accuracy > 0.5
    assert evaluation.train_test_gap == pytest.approx(evaluation.train_accuracy - evaluation.test_accuracy)
    assert evaluation.metrics.location == str(run.local("evaluation", "metrics.json"))
    assert json.loads(Path(evaluation.metrics.location).read_text())["confusion_matrix"] == evaluation.confusion_matrix
    for png in evaluation.plots.values():
        data = run.store.local_copy(png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 150_000
    markdown = evaluation_markdown(evaluation, result, run.store)
    assert markdown.count("](data:image/png;base64,") == 3
    assert f"| test accuracy | {evaluation.test_accuracy:.4f} |" in markdown


def test_the_judge_gets_a_calibration_and_each_test_images_class_through_registration(trained, tmp_path: Path) -> None:
    cached, result = trained
    run = local_run(tmp_path / "run")
    evaluation = evaluate_model(result, cached, run)
    predictions = np.load(run.store.local_copy(evaluation.test_predictions), allow_pickle=False)
    assert predictions.dtype == np.uint8 and predictions.shape == (cached.test.rows,)
    predicted_per_class = np.array(evaluation.confusion_matrix).sum(axis=0).tolist()
    assert np.bincount(predictions, minlength=10).tolist() == predicted_per_class
    calibration = evaluation.calibration
    assert calibration.images == cached.test.rows and calibration.reference_predicted == predicted_per_class
    assert calibration.precision == pytest.approx([row["precision"] for row in evaluation.per_class])

    unknown = VerifiedFile("none", "0" * 64, "test")
    manifest = build_manifest(
        raw=RawDataset(unknown, unknown, unknown, unknown),
        cached=cached,
        params=TrainParams(epochs=2, seed=3),
        trained=result,
        evaluation=evaluation,
        flow_run_id=None,
    )
    registry = Registry(run.store, str(tmp_path / "registry"))
    version = register_model(registry, result, evaluation, manifest, PromotionParams(min_accuracy=0.5)).version
    assert registry.manifest(version).calibration == calibration
    np.testing.assert_array_equal(read_test_predictions(registry, version), predictions)


def test_probabilities_in_chunks_are_keras_predict_for_every_image(trained) -> None:
    _, result = trained
    model = load_verified_model(local_run(Path(result.run.location)).store, result.model)
    labels = np.arange(2 * PREDICT_ROWS + 7) % 10  # two whole chunks and a short one
    images = normalize(synthetic_images(labels, seed=4)).reshape(-1, 28, 28)
    chunked = predicted_probabilities(model, images)
    assert chunked.shape == (len(images), 10)
    np.testing.assert_allclose(chunked, model.predict(images, batch_size=1024, verbose=0), atol=1e-6)


def test_damaged_model_is_refused_before_loading(trained, tmp_path: Path) -> None:
    cached, result = trained
    copy = tmp_path / "model.keras"
    data = bytearray(Path(result.model.location).read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    damaged = dataclasses.replace(result, model=StoredFile(str(copy), result.model.sha256))
    with pytest.raises(IntegrityError, match=r"model.keras: sha256 [0-9a-f]{64} is not the recorded"):
        evaluate_model(damaged, cached, local_run(tmp_path / "run"))
    assert not (tmp_path / "run" / "evaluation").exists()


SAVED_MODEL_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
spec = serve.structured_input_signature[1]["images"]
assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28], spec
np.save(sys.argv[3], serve(images=tf.constant(np.load(sys.argv[2])))["probabilities"].numpy())
"""


def test_the_saved_model_takes_raw_pixels_and_gives_the_keras_models_predictions(trained, tmp_path: Path) -> None:
    cached, result = trained
    run = local_run(tmp_path / "run")
    evaluation = evaluate_model(result, cached, run)
    assert "saved_model/1/saved_model.pb" in evaluation.saved_model
    assert all(run.store.sha256(f.location) == f.sha256 for f in evaluation.saved_model.values())
    labels = np.random.default_rng(5).integers(0, 10, 1000).astype(np.uint8)
    images = synthetic_images(labels, seed=5)
    np.save(tmp_path / "images.npy", images)
    folder = run.local("saved_model", "1")
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            SAVED_MODEL_IN_A_FRESH_PROCESS,
            str(folder),
            tmp_path / "images.npy",
            tmp_path / "out.npy",
        ],
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    keras_model = load_verified_model(run.store, result.model)
    expected = keras_model.predict(normalize(images).reshape(images.shape), verbose=0)
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-5


def test_an_export_that_does_not_reproduce_the_model_is_refused(trained, tmp_path: Path) -> None:
    _, result = trained
    model = load_verified_model(local_run(tmp_path).store, result.model)
    images = synthetic_images(np.arange(10, dtype=np.uint8), seed=6)
    export_saved_model(model, tmp_path / "export")
    expected = model.predict(normalize(images).reshape(images.shape), verbose=0)
    assert check_export(tmp_path / "export", images, expected) <= 1e-5
    with pytest.raises(ExportError, match=r"export: the SavedModel's probabilities differ from the Keras model's by"):
        check_export(tmp_path / "export", images, expected + 1e-3)


def test_a_tuned_model_is_evaluated_exported_and_its_split_recorded(tmp_path: Path) -> None:
    cached = learnable_cache(tmp_path / "cache")
    params = TrainParams(preset="dnn-tuned", epochs=2, batch_size=32)
    run = local_run(tmp_path / "run")
    trained = train_model(cached, params, run)
    evaluation = evaluate_model(trained, cached, run)  # trained on smoothed one-hot labels: scored on classes
    assert evaluation.test_accuracy > 0.5 and 0 < evaluation.test_loss < 2.3
    assert "saved_model/1/saved_model.pb" in evaluation.saved_model  # batch normalization exports as it runs
    unknown = VerifiedFile("none", "0" * 64, "test")
    raw = RawDataset(unknown, unknown, unknown, unknown)
    manifest = build_manifest(
        raw=raw, cached=cached, params=params, trained=trained, evaluation=evaluation, flow_run_id=None
    )
    held = manifest.training.validation
    assert (held.fraction, held.seed, held.rows) == (0.1, params.seed, round(0.1 * cached.train_rows))
    gate = Decision(True, "passed", evaluation.test_accuracy, None, None, 0.5, 0.005)
    version = VersionManifest.model_validate(
        {**manifest.to_json(), "version": "v0001", "registered_at": "now", "gate": dataclasses.asdict(gate)}
    )
    card = model_card(version)
    assert f"**Model selection**: on {held.rows:,} training images held out (0.1 of each class" in card
    assert "AdamW 0.001 (cosine schedule)" in card


def test_a_cnn_with_augmentation_trains_evaluates_and_exports(tmp_path: Path) -> None:
    """The augmentation layers act in training only: the export, checked against the Keras model's
    predictions, would be refused if they shifted or flipped images at inference."""
    cached = learnable_cache(tmp_path / "cache")
    trained = train_model(cached, TrainParams(preset="cnn", epochs=1, batch_size=32), local_run(tmp_path / "run"))
    evaluation = evaluate_model(trained, cached, local_run(tmp_path / "run"))
    assert trained.validation.rows == round(0.1 * cached.train_rows)
    assert "saved_model/1/saved_model.pb" in evaluation.saved_model
    assert sum(row["support"] for row in evaluation.per_class) == cached.test.rows
