"""The canary rollout end to end on real serving processes, with the registry on disk and in a bucket.

Real Keras models, trained and evaluated as the flow does (`evaluate_model`: the calibration and the test
predictions registration keeps), on a test set that holds one T-shirt and one Shirt among 242 images: a model
that answers those two classes swapped passes the offline gate, as in the issue's story. Each version is
registered through the canary policy (`register_model`), served by `fashion-mnist serve` processes sent real
images, stopped with SIGTERM (each writes its last window), and judged by `judge_rollout` from the windows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from fmnist.data.dataset import NUM_CLASSES
from fmnist.evaluation.evaluate import Evaluation, evaluate_model
from fmnist.evaluation.evidence import EvidenceTotals, read_windows, sum_windows
from fmnist.registry.judge import JudgeParams
from fmnist.registry.judging import judge_rollout
from fmnist.registry.labels import CANARY, Labels
from fmnist.registry.registration import prior_run, register_model
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import Store, StoredFile
from fmnist.storage.layout import RunLayout
from fmnist.training.fit import TrainResult, train_model
from fmnist.training.model import TrainParams, load_verified_model
from tests.helpers import GATE, balanced_labels, cached_dataset, local_run, run_manifest, synthetic_images
from tests.rollout_doubles import SWAPPED, traffic
from tests.serving_helpers import PREDICT, metric_samples, running_server, versions_served, wait_for_versions

pytestmark = pytest.mark.training

MIN_SAMPLES = 150  # canary images before a promotion: each case sends more
# The operator's gate under the canary policy; its tolerance lets through a model 2 of 242 test images worse.
POLICY = GATE.model_copy(update={"rollout": "canary", "tolerance": 0.02})
# The rule with a small sample, and a p99 objective a loaded 2-core test machine always meets (a slow canary
# is the judge's own test's case). Its agreement margin is 0.10, not 0.05: on 150-odd shadowed images the
# agreement's 99% interval is about 0.06 either side, and which requests are shadowed is random, so an equal
# canary (another seed) was once left undecided, "waiting on shadow agreement". The swapped canary is caught
# by its estimated accuracy (its test says which check fails); the judge's own tests hold the margins.
RULE = JudgeParams(min_samples=MIN_SAMPLES, max_duration_s=3600, max_p99_ms=10_000, agreement_margin=0.10)
# No body parser processes: these requests (BATCH images) are parsed where they arrive anyway, and spawning
# the parsers cost each server start about 2 CPU-s.
WITHOUT_PARSERS = ("--parse-workers", "0")
CANARY_SERVING = ("--shadow-share", "1", "--canary-share", "0.2", "--evidence-window-s", "1", *WITHOUT_PARSERS)
BATCH = 6  # images a request


@dataclass(frozen=True)
class Evaluated:
    """A run trained and evaluated as the flow's stages leave it, ready to register."""

    name: str
    trained: TrainResult
    evaluation: Evaluation


def rare_pair_cache(folder: Path):
    """Balanced training images; a test set of 30 images of each class but SWAPPED's two, which have one each."""
    train = balanced_labels(50, seed=0)
    test = np.concatenate([np.repeat(np.setdiff1d(np.arange(NUM_CLASSES), SWAPPED), 30), SWAPPED]).astype(np.uint8)
    test = np.random.default_rng(1).permutation(test)
    return cached_dataset(folder, (synthetic_images(train, seed=0), train), (synthetic_images(test, seed=1), test))


def swapped_copy(trained: TrainResult, folder: Path) -> TrainResult:
    """`trained`'s model with its outputs for SWAPPED's two classes exchanged (its last layer's columns), saved
    as a Keras model of its own: a model that answers T-shirt for Shirt and Shirt for T-shirt."""
    model = load_verified_model(Store(), trained.model)
    output = model.layers[-1]
    kernel, bias = output.get_weights()
    order = np.arange(NUM_CLASSES)
    order[list(SWAPPED)] = order[list(reversed(SWAPPED))]
    output.set_weights([kernel[:, order], bias[order]])
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    stored = StoredFile(str(folder / "model.keras"), Store().sha256(str(folder / "model.keras")))
    return replace(trained, run=RunLayout(str(folder)), model=stored)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Evaluated]:
    """The champion, a canary as good (another seed) and one with two classes swapped, each evaluated."""
    folder = tmp_path_factory.mktemp("runs")
    cached = rare_pair_cache(folder / "cache")
    params = TrainParams(preset="mlp128", epochs=3)
    trained = {
        name: train_model(cached, params.model_copy(update={"seed": seed}), local_run(folder / name))
        for name, seed in (("champion", 1), ("equal", 2))
    }
    trained["swapped"] = swapped_copy(trained["champion"], folder / "swapped")
    return {
        name: Evaluated(name, run, evaluate_model(run, cached, local_run(folder / f"{name}-evaluation")))
        for name, run in trained.items()
    }


def register(registry: Registry, run: Evaluated):
    """`run` registered as the register stage does, under the canary policy."""
    evaluation = run.evaluation
    manifest = run_manifest(evaluation.test_accuracy, fingerprint=run.name)
    metrics = manifest.metrics.model_copy(
        update={"test_accuracy": evaluation.test_accuracy, "train_accuracy": evaluation.train_accuracy}
    )
    test_rows = int(np.sum(evaluation.confusion_matrix))  # one test prediction an image: the judge checks it
    data = manifest.data.model_copy(update={"test_rows": test_rows})
    manifest = manifest.model_copy(update={"metrics": metrics, "data": data, "calibration": evaluation.calibration})
    return register_model(registry, run.trained, evaluation, manifest, POLICY)


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    return Registry(store, root + "/registry")


def rolled_out(registry: Registry, runs: dict[str, Evaluated], canary: str) -> None:
    """The champion registered (the first version: promoted), then `canary`, which becomes the canary."""
    assert register(registry, runs["champion"]).promoted
    second = register(registry, runs[canary])
    assert second.canary and not second.promoted, second
    assert Rollouts(registry).active().version == "v0002"


@dataclass
class Sent:
    """Images sent to a rollout's canary: answered by it, or by stable and shadowed to it."""

    served: int = 0
    shadowed: int = 0

    @property
    def canary_images(self) -> int:
        return self.served + self.shadowed


def send(url: str, sent: Sent, labels: np.ndarray, seed: int) -> None:
    """Real images of true classes `labels`, BATCH a request; each answer counted where it went."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for start in range(0, len(labels), BATCH):
            images = synthetic_images(labels[start : start + BATCH].astype(np.uint8), seed=seed + start)
            answer = client.post(PREDICT, json={"instances": images.tolist()})
            assert answer.status_code == 200, answer.text
            if answer.headers["x-model-label"] == CANARY:
                assert answer.headers["x-model-version"] == "v0002"
                sent.served += len(images)
            else:
                assert answer.headers["x-model-version"] == "v0001"
                sent.shadowed += len(images)


def shadow_comparisons(url: str) -> float:
    with httpx.Client(base_url=url) as client:
        samples = metric_samples(client)
    return sum(v for (name, _), v in samples.items() if name == "fashion_mnist_shadow_comparisons_total")


@contextmanager
def serving_rollout(registry: Registry, log: Path) -> Iterator[tuple[str, Sent]]:
    """A real server on `registry` serving its champion and canary, and what is sent to it; stopped with SIGTERM
    at the end, once it has compared every shadowed image (a shadow call runs after stable's answer)."""
    with running_server(registry.root, log, None, *CANARY_SERVING) as running:
        with httpx.Client(base_url=running.url) as client:
            wait_for_versions(client, ["1", "2"])
        sent = Sent()
        yield running.url, sent
        deadline = time.monotonic() + 10
        while shadow_comparisons(running.url) < sent.shadowed:
            assert time.monotonic() < deadline, "the shadow calls did not finish"
            time.sleep(0.1)
    assert "Finished server process" in log.read_text(), log.read_text()[-3000:]  # its shutdown ran


def test_an_equal_canary_is_promoted_after_the_minimum_sample(
    registry: Registry, runs: dict[str, Evaluated], tmp_path: Path
) -> None:
    rolled_out(registry, runs, "equal")
    with serving_rollout(registry, tmp_path / "serve.log") as (url, sent):
        send(url, sent, traffic(240, seed=3), seed=100)
    assert sent.served and sent.shadowed  # both ways of meeting the canary
    early = judge_rollout(registry, RULE.model_copy(update={"min_samples": sent.canary_images + 1}))
    assert early.verdict.action == "wait" and early.verdict.canary_images == sent.canary_images, early.verdict
    judgement = judge_rollout(registry, RULE)
    assert judgement.verdict.action == "promote", judgement.verdict
    assert judgement.champion == registry.champion() == "v0002"
    entry = registry.promotions()[-1]
    assert (entry["version"], entry["event"]) == ("v0002", "promote") and "canary rollout promoted" in entry["reason"]
    assert f'"canary_images":{sent.canary_images}' in entry["reason"]  # the evidence summary, in the audit log
    assert Rollouts(registry).record("v0002").outcome == "promoted"
    assert CANARY not in Labels(registry).records()
    with (
        running_server(registry.root, tmp_path / "next.log", None, *WITHOUT_PARSERS) as running,
        httpx.Client(base_url=running.url) as client,
    ):
        assert versions_served(client) == ["2"]
        answer = client.post(PREDICT, json={"instances": synthetic_images(np.array([3], np.uint8), 7).tolist()})
        assert answer.headers["x-model-version"] == "v0002" and answer.headers["x-model-label"] == "stable"


def written(registry: Registry, version: str) -> EvidenceTotals:
    """`version`'s windows as the servers wrote them, summed (for v0002, the canary: served and shadowed)."""
    read = read_windows(registry.store, registry.root, version, 0)
    assert read.skipped == [] and read.left_out == 0
    return sum_windows(read.windows)


def wait_until_written(registry: Registry, version: str, images: int, timeout_s: float = 20) -> None:
    """Until the windows `version`'s server has written hold `images` images (each is written a window after)."""
    deadline = time.monotonic() + timeout_s
    while (found := written(registry, version).images) < images:
        assert time.monotonic() < deadline, f"{found} of {images} images in {version}'s windows after {timeout_s} s"
        time.sleep(0.2)


def test_a_server_restarted_mid_rollout_neither_loses_nor_recounts_its_evidence(
    registry: Registry, runs: dict[str, Evaluated], tmp_path: Path
) -> None:
    rolled_out(registry, runs, "equal")
    undecided = RULE.model_copy(update={"min_samples": 10_000})  # the count is the point: nothing decided
    with serving_rollout(registry, tmp_path / "first.log") as (url, first):
        send(url, first, traffic(60, seed=4), seed=200)
        time.sleep(1.5)  # a window written while it serves, then the partial one at the stop
        send(url, first, traffic(30, seed=5), seed=300)
    midway = judge_rollout(registry, undecided).verdict
    assert midway.action == "wait" and midway.canary_images == first.canary_images, midway
    with serving_rollout(registry, tmp_path / "second.log") as (url, second):
        send(url, second, traffic(90, seed=6), seed=400)
    verdict = judge_rollout(registry, undecided).verdict
    assert verdict.action == "wait" and verdict.canary_images == first.canary_images + second.canary_images, verdict
    canary, stable = written(registry, "v0002"), written(registry, "v0001")
    assert len(canary.replicas) == len(stable.replicas) == 2  # the restarted process is a replica of its own
    # Every image stable answered was shadowed: both sides of the pairs hold exactly what was sent.
    assert stable.images == np.sum(canary.pairs["v0001"]) == first.shadowed + second.shadowed


def test_two_replicas_at_once_add_up_in_the_judges_totals(
    registry: Registry, runs: dict[str, Evaluated], tmp_path: Path
) -> None:
    rolled_out(registry, runs, "equal")
    with (
        serving_rollout(registry, tmp_path / "a.log") as (url_a, a),
        serving_rollout(registry, tmp_path / "b.log") as (url_b, b),
    ):
        send(url_a, a, traffic(96, seed=7), seed=500)
        send(url_b, b, traffic(96, seed=8), seed=600)
    assert max(a.canary_images, b.canary_images) < MIN_SAMPLES <= a.canary_images + b.canary_images  # only together
    judgement = judge_rollout(registry, RULE)
    verdict = judgement.verdict
    assert verdict.action == "promote" and verdict.canary_images == a.canary_images + b.canary_images, verdict
    assert judgement.champion == "v0002" and len(written(registry, "v0002").replicas) == 2


def test_a_canary_worse_on_the_classes_users_send_is_rolled_back_and_never_champion(
    registry: Registry, runs: dict[str, Evaluated], tmp_path: Path
) -> None:
    offline_gap = runs["champion"].evaluation.test_accuracy - runs["swapped"].evaluation.test_accuracy
    assert 0 < offline_gap <= 2 / 242  # the test set's one T-shirt and one Shirt
    rolled_out(registry, runs, "swapped")  # so it passed the offline gate and became the canary
    with serving_rollout(registry, tmp_path / "serve.log") as (url, sent):
        send(url, sent, traffic(240, SWAPPED, 0.8, seed=9), seed=700)
        wait_until_written(registry, "v0002", sent.canary_images)  # judged while it serves, as deployed
        judgement = judge_rollout(registry, RULE)
        verdict = judgement.verdict
        assert verdict.action == "roll_back", verdict
        with httpx.Client(base_url=url) as client:
            wait_for_versions(client, ["1"])  # at its next poll the server serves the canary no more
            images = synthetic_images(traffic(BATCH, SWAPPED, 0.8, seed=10).astype(np.uint8), seed=800)
            for _ in range(10):
                answer = client.post(PREDICT, json={"instances": images.tolist()})
                assert (answer.headers["x-model-version"], answer.headers["x-model-label"]) == ("v0001", "stable")
    assert written(registry, "v0002").images == sent.canary_images  # and nothing shadowed to it since
    failed = {c.name for c in verdict.checks if c.status == "fail"}
    assert "accuracy under the live class mix" in failed, verdict.checks
    assert judgement.champion == registry.champion() == "v0001"
    assert [e["version"] for e in registry.promotions()] == ["v0001"]
    record = Rollouts(registry).record("v0002")
    assert record.outcome == "rolled_back" and record.evidence["canary_images"] == sent.canary_images
    assert CANARY not in Labels(registry).records()
    assert judge_rollout(registry, RULE).version is None  # decided once: nothing left to judge
    with pytest.raises(RegistryError, match="rolled back in its canary"):
        registry.promote_registered("v0002", POLICY)  # the gate keeps it back
    prior = prior_run(registry, "swapped", POLICY)  # a rerun of the same run retrains and promotes nothing
    assert prior.version == "v0002" and not prior.promoted and "rolled back" in prior.message
    assert registry.champion() == "v0001"
