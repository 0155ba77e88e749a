"""Canary rollouts' records in the registry, on local disk and in a bucket of a real S3 server: the canary
policy at registration, one decision per rollout (judge and operator racing), crash recovery, what the gate
remembers of a rolled-back version, superseding, damaged records, and the `rollout` commands."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from fmnist.evaluation.evaluate import Evaluation
from fmnist.ops import cli
from fmnist.registry.labels import CANARY, Labels
from fmnist.registry.registration import Registration, prior_run, register_model
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import Registry, RegistryError
from fmnist.storage import Store, join
from fmnist.storage.layout import RunLayout
from fmnist.training.fit import TrainResult
from tests.helpers import GATE, run_manifest
from tests.test_registry import run_files

CANARY_GATE = GATE.model_copy(update={"rollout": "canary"})
EVIDENCE = {"action": "roll_back", "canary_images": 2400, "checks": {"shadow agreement": "fail"}}


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    return Registry(store, root + "/registry")


def register(registry: Registry, accuracy: float, gate=CANARY_GATE, fingerprint: str | None = None) -> Registration:
    """A run's registration as the register stage makes it (`register_model`), with no training."""
    number = len(registry.versions())
    tag = f"{accuracy}-{number}"
    run = join(registry.root, "runs", tag)
    files = run_files(registry.store, run, tag)
    model, metrics = files["model.keras"], files["metrics.json"]
    trained = TrainResult(RunLayout(run), model, metrics, "CPU", False, {}, {}, 1, 1, 1.0, 0.5, accuracy)
    evaluation = Evaluation(accuracy, 0.5, accuracy, 0.5, 0.0, [], [], model.sha256, metrics, {}, {})
    manifest = run_manifest(accuracy, fingerprint=fingerprint or f"fp-{number}")
    return register_model(registry, trained, evaluation, manifest, gate)


def canary_label(registry: Registry) -> str | None:
    return Labels(registry).records().get(CANARY, {}).get("version")


@pytest.fixture
def rollout(registry: Registry) -> Rollouts:
    """A registry with champion v0001 and canary v0002 in rollout."""
    assert register(registry, 0.85).outcome == "promoted"
    assert register(registry, 0.86).outcome == "canary"
    return Rollouts(registry)


def test_the_canary_policy_labels_a_passing_version_and_records_its_start(registry: Registry) -> None:
    first = register(registry, 0.85)
    assert (first.outcome, registry.champion()) == ("promoted", "v0001")  # nothing to compare it with live
    rollouts = Rollouts(registry)
    assert rollouts.active() is None and rollouts.status() == []

    second = register(registry, 0.86)
    assert (second.outcome, second.champion, registry.champion()) == ("canary", "v0001", "v0001")
    assert canary_label(registry) == "v0002"
    active = rollouts.active()
    assert (active.version, active.champion, active.outcome) == ("v0002", "v0001", None)
    assert active.offline.passed and active.offline.champion_version == "v0001"
    assert active.offline.candidate_accuracy == 0.86
    assert [e["version"] for e in registry.promotions()] == ["v0001"]  # the audit log: champion changes only
    assert registry.store.exists(join(registry.root, "rollouts", "v0002", "started.json"))

    kept = register(registry, 0.70)  # below the floor: no canary
    assert kept.outcome == "kept back" and rollouts.active().version == "v0002"
    immediate = register(registry, 0.87, gate=GATE)
    assert immediate.outcome == "promoted" and registry.champion() == "v0004"
    forced = register(registry, 0.87, gate=CANARY_GATE.model_copy(update={"force": True}))
    assert forced.outcome == "promoted"  # the operator's decision: no canary


def test_promote_moves_the_champion_with_the_evidence_and_releases_the_label(rollout: Rollouts) -> None:
    registry = rollout.registry
    record = rollout.promote("v0002", "every check passed", {"action": "promote", "canary_images": 2500})
    assert (record.outcome, record.reason, record.evidence["canary_images"]) == ("promoted", "every check passed", 2500)
    assert registry.champion() == "v0002" and canary_label(registry) is None and rollout.active() is None
    entry = registry.promotions()[-1]
    assert (entry["event"], entry["version"], entry["replaced"]) == ("promote", "v0002", "v0001")
    assert "every check passed" in entry["reason"] and '"canary_images":2500' in entry["reason"]
    with pytest.raises(RegistryError, match=r"already decided promoted.*never flips"):
        rollout.roll_back("v0002", "too late", {})


def test_a_judge_and_an_operator_racing_decide_once(registry: Registry, tmp_path: Path) -> None:
    register(registry, 0.85)
    for round_ in range(3):
        canary = register(registry, 0.86 + round_ / 100).version
        outcomes = race(registry, tmp_path, canary)
        won = [who for who, outcome in outcomes.items() if outcome in ("promoted", "rolled_back")]
        assert len(won) == 1, outcomes
        lost = ({"judge", "operator"} - set(won)).pop()
        assert "already decided" in outcomes[lost] and "never flips" in outcomes[lost]
        record = Rollouts(registry).record(canary)
        assert record.outcome == outcomes[won[0]] and record.evidence == {"who": won[0]}
        assert (registry.champion() == canary) == (record.outcome == "promoted")
        assert canary_label(registry) is None
        assert [e["version"] for e in registry.promotions()].count(canary) == (record.outcome == "promoted")


def race(registry: Registry, tmp_path: Path, canary: str) -> dict[str, str]:
    """A judge promoting `canary` and an operator aborting it at the same moment, each from its own store (as
    on two hosts): each one's outcome, or its refusal."""
    barrier, outcomes = threading.Barrier(2), {}

    def decide(who: str, verb: str) -> None:
        rollouts = Rollouts(Registry(Store(scratch=tmp_path / who, timeout_s=10), registry.root))
        barrier.wait()
        try:
            outcomes[who] = getattr(rollouts, verb)(canary, f"by the {who}", {"who": who}).outcome
        except RegistryError as exc:
            outcomes[who] = str(exc)

    threads = [threading.Thread(target=decide, args=a) for a in (("judge", "promote"), ("operator", "roll_back"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def crash(version: str, reason: str) -> None:
    """`Registry.promote` of a host that dies after the decision is written, before the champion moves."""
    raise KeyboardInterrupt("the judge's host died after deciding")


def test_an_interrupted_promote_finishes_on_the_second_call(rollout: Rollouts, monkeypatch, capsys) -> None:
    registry = rollout.registry
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(registry, "promote", crash)
        rollout.promote("v0002", "every check passed", {"canary_images": 2500})
    assert rollout.record("v0002").outcome == "promoted"  # decided, not yet acted on
    assert registry.champion() == "v0001" and canary_label(registry) == "v0002"
    with pytest.raises(RegistryError, match="already decided promoted"):
        rollout.roll_back("v0002", "an operator, after the crash", {})  # decided: never flips

    assert rollout.unfinished().version == "v0002"  # what the judge finishes before judging
    assert cli.main(["--registry", registry.root, "rollout", "status"]) == 0
    shown = capsys.readouterr().out
    assert "v0002 decided promoted but not carried out" in shown and "`fashion-mnist rollout promote v0002`" in shown
    assert rollout.finish_decided().outcome == "promoted"
    assert registry.champion() == "v0002" and canary_label(registry) is None and rollout.unfinished() is None
    assert rollout.finish_decided() is None
    log = registry.promotions()
    rollout.promote("v0002", "run a third time", {})  # done: nothing more happens
    assert registry.promotions() == log and [e["version"] for e in log] == ["v0001", "v0002"]


def test_a_promotion_the_champion_moved_past_is_not_forced_through(rollout: Rollouts, monkeypatch) -> None:
    registry = rollout.registry
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(registry, "promote", crash)
        rollout.promote("v0002", "every check passed", {})
    # A run already past its own start promotes v0003 meanwhile (the registry's own register: a run that began
    # before the decision finishes it first, `register_model`).
    registry.register(run_files(registry.store, join(registry.root, "runs", "late"), "late"), run_manifest(0.90), GATE)
    with pytest.raises(RegistryError, match=r"champion has moved since .v0003 now.*fashion-mnist promote v0002"):
        rollout.promote("v0002", "every check passed", {})
    assert registry.champion() == "v0003" and canary_label(registry) == "v0002"
    with pytest.raises(RegistryError, match="champion has moved since"):
        rollout.finish_decided()  # the judge's run: says so, and stops serving a canary it cannot promote
    assert registry.champion() == "v0003" and canary_label(registry) is None and rollout.finish_decided() is None


def test_a_canary_whose_files_are_damaged_is_refused_before_any_decision(rollout: Rollouts) -> None:
    registry = rollout.registry
    registry.store.write_bytes(join(registry.version_dir("v0002"), "model.keras"), b"replaced")
    with pytest.raises(RegistryError, match=r"refusing to promote canary v0002: v0002 is damaged \(model.keras\)"):
        rollout.promote("v0002", "every check passed", {})
    assert rollout.record("v0002").outcome is None  # undecided: it can still be rolled back
    assert rollout.roll_back("v0002", "damaged\nfiles", {}).reason == "damaged files"  # one line


def test_a_rolled_back_version_is_kept_back_by_the_gate(registry: Registry) -> None:
    register(registry, 0.85)
    register(registry, 0.86, fingerprint="swapped-classes")
    rollouts = Rollouts(registry)
    record = rollouts.roll_back("v0002", "shadow agreement 0.71, expected 0.93", EVIDENCE)
    assert (record.outcome, record.evidence) == ("rolled_back", EVIDENCE)
    assert canary_label(registry) is None and rollouts.active() is None and registry.champion() == "v0001"
    assert rollouts.rolled_back() == {"v0002"}
    assert [e["version"] for e in registry.promotions()] == ["v0001"]

    prior = prior_run(registry, "swapped-classes", CANARY_GATE)
    assert not prior.promoted and not prior.canary and registry.champion() == "v0001"
    assert "rolled back in its canary on " in prior.message and "shadow agreement 0.71" in prior.message
    assert "Nothing retrained" in prior.message
    with pytest.raises(RegistryError, match=r"rolled back in its canary.*fashion-mnist promote v0002"):
        registry.promote_registered("v0002", GATE)  # nor under the immediate policy
    with pytest.raises(RegistryError, match="never starts again"):
        rollouts.start("v0002", record.offline)
    registry.promote("v0002", "the operator overrules the judge")  # an operator's explicit promote still works
    assert registry.champion() == "v0002"


def test_a_new_canary_supersedes_the_active_one(rollout: Rollouts) -> None:
    registry = rollout.registry
    newer = register(registry, 0.87, fingerprint="newer")
    assert newer.outcome == "canary" and rollout.active().version == "v0003" and canary_label(registry) == "v0003"
    old = rollout.record("v0002")
    assert old.outcome == "superseded" and "superseded by v0003" in old.reason
    with pytest.raises(RegistryError, match="already decided superseded"):
        rollout.promote("v0002", "the judge, late", {})
    assert registry.champion() == "v0001"  # never champion
    assert "superseded in its canary on " in prior_run(registry, "fp-1", CANARY_GATE).message
    assert [r.version for r in rollout.status()] == ["v0003", "v0002"]


def test_only_the_active_canary_is_decided(rollout: Rollouts) -> None:
    with pytest.raises(RegistryError, match="v0001 is not the canary of the rollout in progress: v0002 is"):
        rollout.roll_back("v0001", "wrong version", {})
    with pytest.raises(RegistryError, match="is not a version"):
        rollout.promote("../v0002", "a path", {})
    with pytest.raises(RegistryError, match=r"evidence is 2\d{4} bytes of JSON; at most 16384"):
        rollout.promote("v0002", "too much", {"windows": "x" * 20_000})
    with pytest.raises(RegistryError, match="not plain JSON"):
        rollout.promote("v0002", "not JSON", {"accuracy": float("nan")})
    assert rollout.active().version == "v0002"  # nothing was decided
    Labels(rollout.registry).clear(CANARY)  # the operator stopped serving it by hand: no rollout in progress
    with pytest.raises(RegistryError, match="no rollout is active"):
        rollout.promote("v0002", "gone", {})


def test_a_crash_between_registration_and_the_start_is_finished_by_the_next_run(registry: Registry) -> None:
    register(registry, 0.85)
    files = run_files(registry.store, join(registry.root, "runs", "crashed"), "crashed")
    held = registry.register(files, run_manifest(0.86, fingerprint="crashed"), CANARY_GATE)  # no rollout started
    assert held.canary and not held.promoted and Rollouts(registry).active() is None
    prior = prior_run(registry, "crashed", CANARY_GATE)
    assert prior.canary and "made it the canary" in prior.message and Rollouts(registry).active().version == "v0002"
    again = prior_run(registry, "crashed", CANARY_GATE)
    assert not again.canary and "is the canary of the rollout in progress" in again.message


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("decided.json", b"{not json", "not valid JSON"),
        ("decided.json", json.dumps({"version": "v0009"}).encode(), "names version 'v0009', not its folder's v0002"),
        ("decided.json", None, "outcome 'maybe' is none of promoted, rolled_back, superseded"),
        ("started.json", json.dumps({"version": "v0002", "at": "yesterday"}).encode(), "at is not a time"),
        ("started.json", None, "decision: passed"),
    ],
)
def test_damaged_records_are_refused_naming_the_file_and_the_way_out(
    rollout: Rollouts, name: str, content: bytes | None, problem: str
) -> None:
    rollout.roll_back("v0002", "bad canary", EVIDENCE)
    location = join(rollout.root, "v0002", name)
    if content is None:  # a field edited
        record = json.loads(rollout.registry.store.read_bytes(location))
        if name == "decided.json":
            record["outcome"] = "maybe"
        else:
            record["decision"]["passed"] = "yes"
        content = json.dumps(record).encode()
    rollout.registry.store.write_bytes(location, content)
    with pytest.raises(RegistryError) as refused:
        rollout.status()
    message = str(refused.value)
    assert message.startswith(f"{location}: a damaged rollout record") and problem in message
    assert "move it aside" in message and ("rollout abort v0002" in message or "label canary --clear" in message)
    if name == "decided.json":
        with pytest.raises(RegistryError, match="a damaged rollout record"):
            prior_run(rollout.registry, "fp-1", CANARY_GATE)  # the gate never guesses past a damaged decision


def test_the_rollout_commands(rollout: Rollouts, capsys) -> None:
    registry = rollout.registry
    base = ["--registry", registry.root]
    assert cli.main([*base, "rollout", "status"]) == 0
    shown = capsys.readouterr().out
    assert "Champion of" in shown and "Rollout in progress: canary v0002" in shown and "in progress" in shown
    assert cli.main([*base, "versions"]) == 0
    assert "canary since " in capsys.readouterr().out

    assert cli.main([*base, "rollout", "abort", "v0001"]) == 1
    assert "v0002 is" in capsys.readouterr().err  # refused, naming the active canary
    assert cli.main([*base, "rollout", "promote", "--reason", "looks right to me"]) == 0
    assert f"v0002's rollout is decided promoted: it is now the champion of {registry.root}" in capsys.readouterr().out
    assert registry.champion() == "v0002" and rollout.record("v0002").evidence == {"decided_by": "operator"}

    register(registry, 0.87)
    assert cli.main([*base, "rollout", "abort"]) == 0
    assert f"v0003's rollout is decided rolled back: no longer the canary of {registry.root}" in capsys.readouterr().out
    assert cli.main([*base, "rollout", "abort"]) == 1
    assert "no rollout in progress" in capsys.readouterr().err
    assert cli.main([*base, "versions"]) == 0
    assert "rolled back in its canary: rolled back by the operator" in capsys.readouterr().out
    assert cli.main([*base, "rollout", "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "No rollout in progress" in lines
    rows = [line.split()[:3:2] for line in lines if line.startswith("v000")]
    assert rows == [["v0003", "rolled"], ["v0002", "promoted"]]


def test_the_nightly_deployments_roll_out_as_canaries_and_the_ad_hoc_ones_at_once() -> None:
    from flows.params import RetrainParams

    deployments = yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())["deployments"]
    retrains = {d["name"]: d for d in deployments if d["entrypoint"] == "flows/retrain.py:retrain"}
    policies = {
        name: RetrainParams.model_validate(d["parameters"].get("params", {})).promotion.rollout
        for name, d in retrains.items()
    }
    canary, immediate = {"nightly", "nightly-cluster"}, {"adhoc", "adhoc-cluster"}
    assert policies == {**dict.fromkeys(canary, "canary"), **dict.fromkeys(immediate, "immediate")}
