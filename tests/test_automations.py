"""automations.yaml: every automation validates as Prefect's model, with its deploy-time values filled in."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from fmnist.ops import automations
from fmnist.ops.automations import AutomationsError, load

FILE = Path(__file__).resolve().parent.parent / "automations.yaml"


def test_heartbeat_window_and_webhook_are_filled_in() -> None:
    some_id = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    automations, skipped = load(
        FILE,
        {"heartbeat_window_s": 90, "start_window_s": 600, "notify_block_id": some_id, "retrain_deployment_id": some_id},
    )
    assert skipped == {}
    by_name = {a.name: a for a in automations}
    crash = by_name["fashion-mnist: crash runs whose heartbeats stopped"]
    assert crash.trigger.within == timedelta(seconds=90) and crash.trigger.posture == "Proactive"
    assert crash.actions[0].type == "change-flow-run-state" and "90 s" in crash.actions[0].message
    never_started = by_name["fashion-mnist: crash runs that never started"]
    assert never_started.trigger.within == timedelta(seconds=600) and never_started.trigger.posture == "Proactive"
    assert never_started.trigger.after == {"prefect.flow-run.Pending"}
    # Every state a run leaves Pending for closes the window; a heartbeat is no state, and comes only once it runs.
    assert {"prefect.flow-run.Running", "prefect.flow-run.Crashed"} <= never_started.trigger.expect
    assert not any("heartbeat" in e or "*" in e for e in never_started.trigger.expect)
    assert never_started.actions[0].force is False and "600 s" in never_started.actions[0].message
    notify = by_name["fashion-mnist: tell the operator"]
    assert {"fashion-mnist.run.failed", "fashion-mnist.model.promoted"} <= notify.trigger.expect
    assert {"fashion-mnist.champion.drifted", "fashion-mnist.rollout.rolled-back"} <= notify.trigger.expect
    assert str(notify.actions[0].block_document_id).startswith("00000000")
    retrain = by_name["fashion-mnist: retrain when the champion drifts"]
    assert retrain.trigger.expect == {"fashion-mnist.champion.drifted"}
    assert retrain.actions[0].type == "run-deployment" and str(retrain.actions[0].deployment_id) == some_id


def test_without_a_webhook_or_a_retrain_deployment_their_automations_are_left_out_saying_why() -> None:
    automations, skipped = load(FILE, {"heartbeat_window_s": 540, "start_window_s": 1800})
    assert [a.name for a in automations] == [
        "fashion-mnist: crash runs whose heartbeats stopped",
        "fashion-mnist: crash runs that never started",
    ]
    notifications = [name for name in skipped if name.startswith("fashion-mnist: tell the operator")]
    assert len(notifications) == 2 and all("make webhook" in skipped[name] for name in notifications)
    assert "RETRAIN_ON_DRIFT" in skipped.pop("fashion-mnist: retrain when the champion drifts")
    assert len(skipped) == 2


def test_a_bad_automation_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "automations.yaml"
    bad.write_text("automations:\n  - name: 'fashion-mnist: broken'\n    trigger: {type: nonsense}\n    actions: []\n")
    with pytest.raises(AutomationsError, match="'fashion-mnist: broken'"):
        load(bad, {})
    bad.write_text("automations:\n  - name: someone else's\n    trigger: {}\n    actions: []\n")
    with pytest.raises(AutomationsError, match="named 'fashion-mnist: '"):
        load(bad, {})


BAD_WEBHOOK_URLS = {
    "no scheme": "hooks.example.com/services/T0/B0/secret-token",
    "not http": "ftp://example.com/hook",
    "javascript": "javascript:alert(1)",
    "no host": "https:///hook",
    "a space": "https://exa mple.com/hook",
    "a newline": "https://example.com/hook\nX-Injected: 1",
    "a port out of range": "https://example.com:99999/hook",
    "a port that is no number": "https://example.com:http/hook",
    "port 0": "https://example.com:0/hook",
    "too long": "https://example.com/" + "a" * 3000,
    "a host urllib refuses, quoting it": "https://ops:secret-token@hooks.ex\u2100ample.com/T0",
    "a bracketed host that is no address": "https://[secret-token-host]/hook",
    "a bracket left open": "https://[::1/secret-token",
    "a host no name can be": "https://exa<mple>.com/secret-token",
    "a label over 63 characters": "https://" + "a" * 64 + ".example.com/secret-token",
    "an empty label": "https://../secret-token",
}


@pytest.mark.parametrize("case", BAD_WEBHOOK_URLS)
def test_a_webhook_url_no_notification_could_reach_is_refused_before_anything_is_saved(case: str, monkeypatch) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    saved = []
    monkeypatch.setattr(CustomWebhookNotificationBlock, "save", lambda *args, **kwargs: saved.append(args))
    with pytest.raises(ValueError, match="webhook URL") as refused:
        automations.configure_webhook(BAD_WEBHOOK_URLS[case])
    assert saved == []
    assert "secret-token" not in str(refused.value)  # a webhook URL's path often holds its token: never echoed


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/services/T0/B0/x?y=1",
        "http://127.0.0.1:9/notify",
        "https://[::1]:8443/h",
        "HTTPS://user:pass@Hooks.Example.com/h",
        "https://bücher.example/h",
        "http://alerts_receiver:8080/h",
    ],
)
def test_webhook_urls_that_take_a_post_are_kept_as_typed(url: str) -> None:
    assert automations.checked_webhook_url(url) == url
