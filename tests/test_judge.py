"""The rollout judge's rule on synthetic models whose true behaviour is known, and the judge acting on a real
registry (local disk and a real S3 server's bucket) from evidence windows as servers write them."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from fmnist.evaluation.evidence import LATENCY_BOUNDS_MS, EvidenceTotals
from fmnist.ops import cli
from fmnist.registry import judging
from fmnist.registry.judge import JudgeParams, LiveEvidence, Offline, judge
from fmnist.registry.judging import judge_rollout
from fmnist.registry.labels import CANARY, Labels
from fmnist.registry.registration import prior_run
from fmnist.registry.rollout import Rollouts
from fmnist.registry.versions import Registry
from fmnist.storage import Store
from tests.helpers import GATE
from tests.rollout_doubles import (
    HELD_OUT,
    RULE,
    SWAPPED,
    Versions,
    register,
    roll_out,
    traffic,
    write_ledger,
    write_windows,
)


def failed(verdict) -> set[str]:
    return {c.name for c in verdict.checks if c.status == "fail"}


def test_an_equal_canary_waits_for_the_minimum_sample_then_is_promoted() -> None:
    versions = Versions()
    early = judge(versions.live(traffic(500)), versions.offline, RULE)
    assert early.action == "wait" and "500 of 2000 images" in early.reason, early
    verdict = judge(versions.live(traffic(3000)), versions.offline, RULE)
    assert verdict.action == "promote", verdict
    statuses = {c.name: c.status for c in verdict.checks}
    assert statuses.pop("accuracy on reviewed images") == "unavailable"  # nothing reviewed yet
    assert set(statuses.values()) == {"pass"}, verdict.checks
    agreement = next(c for c in verdict.checks if c.name == "shadow agreement")
    assert abs(agreement.canary - agreement.reference) < 0.03  # live agreement as the test set predicts


def test_a_better_canary_is_promoted_on_traffic_like_the_test_sets_and_unlike_it() -> None:
    versions = Versions(canary_accuracy=0.95)
    for live in (traffic(3000), traffic(3000, SWAPPED, 0.8)):
        verdict = judge(versions.live(live), versions.offline, RULE)
        assert verdict.action == "promote", verdict
        mix = next(c for c in verdict.checks if c.name == "accuracy under the live class mix")
        assert mix.canary > mix.reference  # better where users send, as it was offline


def test_a_canary_worse_on_the_classes_users_send_is_rolled_back_though_it_passed_offline() -> None:
    versions = Versions(canary_swap_rate=0.1)
    offline_gap = (versions.stable_held_out.argmax(axis=1) == np.arange(HELD_OUT) % 10).mean() - (
        versions.canary_held_out.argmax(axis=1) == np.arange(HELD_OUT) % 10
    ).mean()
    assert offline_gap < 0.02  # balanced held-out images: 2 classes of 10, so the swap costs it little offline
    verdict = judge(versions.live(traffic(3000, SWAPPED, 0.8)), versions.offline, RULE)
    assert verdict.action == "roll_back", verdict
    assert "accuracy under the live class mix" in failed(verdict), verdict.checks
    # On traffic like the test set's it is as little worse as offline, within the margin: not caught.
    uniform = judge(versions.live(traffic(3000)), versions.offline, RULE)
    assert not failed(uniform), uniform.checks


def test_a_canary_that_disagrees_more_live_than_on_the_test_set_is_rolled_back() -> None:
    versions = Versions()
    verdict = judge(versions.live(traffic(3000), canary_broken=0.2), versions.offline, RULE)
    assert verdict.action == "roll_back" and "shadow agreement" in failed(verdict), verdict.checks
    # The same shortfall on few images is not yet a verdict on agreement: its bound is wide.
    few = judge(versions.live(traffic(60), canary_broken=0.08), versions.offline, RULE)
    assert "shadow agreement" not in failed(few)


def test_reviewed_answers_are_the_truth_the_canary_is_held_to() -> None:
    versions = Versions()
    evidence = versions.live(traffic(3000))
    worse = judge(replace(evidence, reviewed_canary=(60, 100), reviewed_stable=(90, 100)), versions.offline, RULE)
    assert worse.action == "roll_back" and failed(worse) == {"accuracy on reviewed images"}, worse.checks
    close = judge(replace(evidence, reviewed_canary=(86, 100), reviewed_stable=(90, 100)), versions.offline, RULE)
    assert close.action == "promote"  # 0.04 below on 100 each is within the sampling error
    few = judge(replace(evidence, reviewed_canary=(5, 20), reviewed_stable=(90, 100)), versions.offline, RULE)
    reviewed = next(c for c in few.checks if c.name == "accuracy on reviewed images")
    assert reviewed.status == "unavailable" and "20 of the canary's" in reviewed.detail


def test_service_objectives_roll_back_a_failing_or_slow_canary() -> None:
    versions = Versions()
    evidence = versions.live(traffic(3000), failures=150)
    verdict = judge(evidence, versions.offline, RULE)
    assert verdict.action == "roll_back" and failed(verdict) == {"error rate"}, verdict.checks
    slow = replace(evidence.canary, errors={}, latency_ms=[0] * len(LATENCY_BOUNDS_MS) + [3150])
    verdict = judge(replace(evidence, canary=slow), versions.offline, RULE)
    assert failed(verdict) == {"p99 latency"} and "above 10000 ms" in verdict.reason, verdict
    assert verdict.summary()["checks"]["p99 latency"]["canary"] is None  # no infinity in JSON


def test_every_call_of_the_canarys_model_counts_and_no_client_refusal_does() -> None:
    """A shadow-only rollout whose shadow calls half fail; a canary whose failures are diluted by refused requests
    (a client's bad bodies never reached the model: the windows' latency holds only the calls that did)."""
    versions = Versions()
    evidence = versions.live(traffic(3000))
    failing = replace(evidence.canary, errors={"model_failed": 3000}, latency_ms=[0, 0, 6000] + [0] * 11)
    verdict = judge(replace(evidence, canary=failing), versions.offline, RULE)
    assert verdict.action == "roll_back" and failed(verdict) == {"error rate"}, verdict.checks
    diluted = replace(failing, requests=3000 + 3000 + 80_000, errors={"model_failed": 3000, "bad_request": 80_000})
    verdict = judge(replace(evidence, canary=diluted), versions.offline, RULE)
    assert failed(verdict) == {"error rate"} and "3000 failed in 6000 model calls" in verdict.reason


def test_evidence_the_judge_did_not_read_never_promotes() -> None:
    versions = Versions()
    evidence = replace(versions.live(traffic(3000)), left_out=40)
    verdict = judge(evidence, versions.offline, RULE)
    assert verdict.action == "wait" and "40 evidence windows beyond" in verdict.reason
    assert judge(replace(evidence, elapsed_s=RULE.max_duration_s), versions.offline, RULE).action == "roll_back"


@pytest.mark.parametrize("bad", [{"min_samples": True}, {"max_duration_s": 1e-300}, {"z": 0}, {"min_samples": 0}])
def test_the_rules_thresholds_are_checked(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        JudgeParams.model_validate(bad)


def test_at_the_maximum_duration_the_judge_decides_on_what_it_has() -> None:
    versions = Versions()
    quiet = replace(versions.live(traffic(300)), elapsed_s=RULE.max_duration_s)
    verdict = judge(quiet, versions.offline, RULE)  # too few images to tell the estimates apart: no promotion
    assert verdict.action == "roll_back" and "accuracy by ATC" in verdict.reason.split("too little evidence for")[1]
    no_stable = replace(versions.live(traffic(3000)), stable=EvidenceTotals(), elapsed_s=RULE.max_duration_s)
    verdict = judge(no_stable, versions.offline, RULE)  # stable's windows missing: nothing to compare with
    assert verdict.action == "roll_back" and "too little evidence" in verdict.reason, verdict
    unknown = Offline(None, None, None, None)  # versions from before calibrations: the checks it has, passed
    verdict = judge(quiet, unknown, RULE)
    assert verdict.action == "promote" and "300 live images (2000 asked for)" in verdict.reason, verdict
    nothing = LiveEvidence(EvidenceTotals(), EvidenceTotals(), None, RULE.max_duration_s)
    verdict = judge(nothing, versions.offline, RULE)
    assert verdict.action == "roll_back" and "no live traffic" in verdict.reason
    assert judge(replace(nothing, elapsed_s=60), versions.offline, RULE).action == "wait"


def test_versions_registered_before_calibrations_are_judged_on_what_they_have() -> None:
    versions = Versions()
    unknown = Offline(None, None, None, None)
    verdict = judge(versions.live(traffic(3000)), unknown, RULE)
    statuses = {c.name: c.status for c in verdict.checks}
    assert statuses["shadow agreement"] == statuses["accuracy by ATC"] == "unavailable"
    assert verdict.action == "promote" and statuses["error rate"] == "pass"


# --- on a registry ---------------------------------------------------------------------------------------


@pytest.fixture
def registry(root: str, store: Store) -> Registry:
    return Registry(store, root + "/registry")


@pytest.mark.parametrize("swap_rate", [0.0, 0.1], ids=["equal", "swapped"])
def test_the_judge_promotes_or_rolls_back_the_registrys_canary_from_the_windows(
    registry: Registry, swap_rate: float
) -> None:
    versions = Versions(canary_swap_rate=swap_rate)
    offline = versions.offline
    assert register(registry, 0.88, offline.stable_calibration, offline.stable_predictions, "canary").promoted
    second = register(registry, 0.88, offline.canary_calibration, offline.canary_predictions, "canary")
    assert not second.promoted and Rollouts(registry).active().version == "v0002"
    assert judge_rollout(registry, RULE).verdict.action == "wait"  # no evidence yet

    live = versions.live(traffic(3000, SWAPPED, 0.8 if swap_rate else 0.0))
    write_windows(registry, "v0001", "stable", "served", live.stable)
    pairs = {"paired_with": "v0001", "pairs": live.pairs.tolist()}
    write_windows(registry, "v0002", "canary", "shadow", live.canary, **pairs)
    judgement = judge_rollout(registry, RULE)
    assert judgement.verdict.action != "wait", judgement
    [row] = judgement.timeline  # one window: one period of the report
    assert row.canary_images == 3000 and abs(row.agreement - np.trace(live.pairs) / 3000) < 1e-9
    record = Rollouts(registry).record("v0002")
    assert Labels(registry).records().get(CANARY) is None  # served as canary no more, either way
    if swap_rate:
        assert judgement.verdict.action == "roll_back" and registry.champion() == "v0001"
        assert record.outcome == "rolled_back" and record.evidence["canary_images"] == 3000
        prior = prior_run(registry, "0.88-1", GATE)
        assert prior is not None and not prior.promoted and "rolled back" in prior.message
    else:
        assert judgement.verdict.action == "promote" and registry.champion() == "v0002"
        assert record.outcome == "promoted"
        assert "live evidence" in registry.promotions()[-1]["reason"]
    assert judge_rollout(registry, RULE).version is None  # decided once; nothing left to judge


def test_the_judge_holds_both_versions_to_what_reviewers_labeled(registry: Registry) -> None:
    """Live evidence that would promote the canary, and the loop's reviews of its answers since the rollout
    started that say it is worse: rolled back on the truth. A ledger from before answers were kept is named."""
    versions = Versions()
    live = versions.live(traffic(3000))
    roll_out(registry, versions, live)
    feedback = registry.root.removesuffix("/registry") + "/data/feedback"
    now = time.time()
    canary = [("v0002", 3 if n % 2 else 4, 4, now) for n in range(80)]  # half of them wrong
    stable = [("v0001", 4, 4, now)] * 76 + [("v0001", 3, 4, now)] * 4
    before = [("v0002", 4, 4, now - 86400)] * 500  # reviewed answers from before the rollout: not its evidence
    write_ledger(registry.store, feedback, "review-1", canary + stable + before)
    write_ledger(registry.store, feedback, "review-0", stable, old=True)

    judgement = judge_rollout(registry, RULE, feedback=feedback)
    reviewed = next(c for c in judgement.verdict.checks if c.name == "accuracy on reviewed images")
    assert (reviewed.status, reviewed.canary, reviewed.reference) == ("fail", 0.5, 0.95), reviewed
    assert judgement.verdict.action == "roll_back" and registry.champion() == "v0001"
    assert any("review-0.json" in s and "do not say what was answered" in s for s in judgement.skipped)


def test_rollout_status_shows_the_evidence_now_as_the_judge_reads_it(registry: Registry, capsys) -> None:
    versions = Versions(canary_swap_rate=0.1)
    live = versions.live(traffic(3000, SWAPPED, 0.8))
    roll_out(registry, versions, live)
    data_root = registry.root.removesuffix("/registry") + "/data"
    assert cli.main(["--registry", registry.root, "rollout", "status", "--data-root", data_root]) == 0
    shown = capsys.readouterr().out
    assert "The evidence now, by the default rule: roll back" in shown, shown
    assert "accuracy under the live class mix" in shown and "shadow agreement" in shown
    assert Rollouts(registry).active().version == "v0002"  # shown, not acted on: the judge decides


def test_an_operator_deciding_while_the_judge_reads_the_evidence_wins_and_fails_no_judge(
    registry: Registry, monkeypatch
) -> None:
    versions = Versions()
    live = versions.live(traffic(3000))
    roll_out(registry, versions, live)
    read_evidence = judging.assess

    def operator_aborts_meanwhile(*args, **kwargs):
        judgement = read_evidence(*args, **kwargs)  # the evidence says promote ...
        Rollouts(registry).roll_back("v0002", "aborted by hand", {"decided_by": "operator"})  # ... the operator aborts
        return judgement

    monkeypatch.setattr(judging, "assess", operator_aborts_meanwhile)
    judgement = judging.judge_rollout(registry, RULE)
    assert judgement.verdict.action == "promote" and judgement.decided_meanwhile == "rolled_back"
    assert registry.champion() == "v0001" and Rollouts(registry).record("v0002").reason == "aborted by hand"


@pytest.mark.parametrize("by_hand", ["the canary", "another version"])
def test_a_champion_moved_by_hand_during_the_rollout_ends_it_without_overruling_the_operator(
    registry: Registry, by_hand: str
) -> None:
    versions = Versions()
    offline = versions.offline
    for _ in range(2):  # v0001 champion, v0002 passed over ...
        register(registry, 0.88, offline.stable_calibration, offline.stable_predictions, "immediate")
    register(
        registry, 0.88, offline.canary_calibration, offline.canary_predictions, "canary"
    )  # v0003, gated against v0002
    live = versions.live(traffic(3000))
    write_windows(registry, "v0003", "canary", "shadow", live.canary, paired_with="v0002", pairs=live.pairs.tolist())
    moved_to = "v0003" if by_hand == "the canary" else "v0001"
    if moved_to == "v0003":
        registry.promote("v0003", "by hand")
    else:
        registry.rollback("by hand")
    judgement = judge_rollout(registry, RULE.model_copy(update={"max_duration_s": 60}), now=time.time() + 3600)
    assert registry.champion() == moved_to and Labels(registry).records().get(CANARY) is None
    record = Rollouts(registry).record("v0003")
    if moved_to == "v0003":
        assert judgement.decided_meanwhile == record.outcome == "promoted"
    else:  # never promoted over the operator's rollback, however long it waited
        assert judgement.decided_meanwhile == record.outcome == "superseded" and "v0002 to v0001" in record.reason


@pytest.mark.parametrize("swap_rate", [0.0, 0.1], ids=["evidence-holds", "evidence-against"])
def test_a_promotion_decided_and_not_carried_out_is_made_only_if_the_evidence_still_holds(
    registry: Registry, swap_rate: float, monkeypatch
) -> None:
    """Its decider stopped between deciding and moving the pointer (or its file was forged): the judge carries it
    out only on evidence that says promote; otherwise the canary is no longer served, and nothing is promoted."""
    versions = Versions(canary_swap_rate=swap_rate)
    live = versions.live(traffic(3000, SWAPPED, 0.8 if swap_rate else 0.0))
    roll_out(registry, versions, live)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(registry, "promote", stopped)
        Rollouts(registry).promote("v0002", "every check passed", {})
    judgement = judge_rollout(registry, RULE)
    if swap_rate:
        assert judgement.decided_meanwhile == "promoted, not carried out" and registry.champion() == "v0001"
        assert judgement.verdict.action == "roll_back" and Labels(registry).records().get(CANARY) is None
    else:
        assert registry.champion() == "v0002" and Labels(registry).records().get(CANARY) is None


def test_a_champion_moved_by_hand_while_the_evidence_is_read_is_not_overruled(registry: Registry, monkeypatch) -> None:
    versions = Versions()
    offline = versions.offline
    register(registry, 0.88, offline.stable_calibration, offline.stable_predictions, "canary")
    register(registry, 0.88, offline.canary_calibration, offline.canary_predictions, "canary")
    assert not register(registry, 0.5, offline.stable_calibration, offline.stable_predictions, "canary").promoted
    live = versions.live(traffic(3000))
    write_windows(registry, "v0001", "stable", "served", live.stable)
    write_windows(registry, "v0002", "canary", "shadow", live.canary, paired_with="v0001", pairs=live.pairs.tolist())
    read_evidence = judging.assess

    def operator_promotes_another_meanwhile(*args, **kwargs):
        judgement = read_evidence(*args, **kwargs)  # the evidence says promote v0002 ...
        registry.promote("v0003", "the operator's choice, by hand")  # ... the operator chose v0003
        return judgement

    monkeypatch.setattr(judging, "assess", operator_promotes_another_meanwhile)
    judgement = judging.judge_rollout(registry, RULE)
    assert judgement.verdict.action == "promote" and judgement.decided_meanwhile == "superseded"
    assert registry.champion() == "v0003" and [e["version"] for e in registry.promotions()] == ["v0001", "v0003"]
