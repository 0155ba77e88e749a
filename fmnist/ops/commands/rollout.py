"""The canary rollout's commands: rollout status, and rollout promote / abort for an operator who decides by hand."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from fmnist.ops import events
from fmnist.ops.commands.roots import feedback_root, registry_of, reviews_flag
from fmnist.registry.judge import JudgeParams
from fmnist.registry.judging import assess
from fmnist.registry.rollout import RolloutRecord, Rollouts
from fmnist.registry.versions import Registry, RegistryError

OPERATOR = {"decided_by": "operator"}  # the evidence of a decision made by hand: the operator's own judgement


def cmd_status(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    rollouts = Rollouts(registry)
    active = rollouts.active()
    print(f"Champion of {registry.root}: {registry.champion() or 'none'}")
    if (unfinished := rollouts.unfinished()) is not None:
        finish = {"promoted": "rollout promote", "rolled_back": "rollout abort"}.get(unfinished.outcome)
        finish = f"{finish} {unfinished.version}" if finish else "label canary --clear"
        print(
            f"Rollout of {unfinished.version} decided {_outcome(unfinished, None)} but not carried out (its host "
            f"stopped?): `fashion-mnist {finish}` finishes it "
            "(the judge does, on its next run)"
        )
    elif active is None:
        print("No rollout in progress")
    else:
        print(
            f"Rollout in progress: canary {active.version} since {active.started_at}, gated against "
            f"{active.champion or 'no champion'} ({active.offline.reason}); the judge decides, or "
            "`fashion-mnist rollout promote` / `rollout abort`"
        )
        _evidence_now(registry, active, feedback_root(args))
    records = rollouts.status()
    if not records:
        print(f"No rollouts in {rollouts.root}")
        return
    print(f"\n{'version':9}{'started':27}{'outcome':13}{'decided':27}reason")
    made = registry.ever_champion()
    for record in records:
        outcome = _outcome(record, active, made, unfinished)
        print(f"{record.version:9}{record.started_at:27}{outcome:13}{record.decided_at or '':27}{record.reason or ''}")


def _evidence_now(registry: Registry, active: RolloutRecord, feedback: str) -> None:
    """The live evidence as the judge's default rule reads it now (a deployment may set other thresholds)."""
    verdict = assess(registry, active, JudgeParams(), time.time(), feedback).verdict
    print(f"\nThe evidence now, by the default rule: {verdict.action.replace('_', ' ')} ({verdict.reason})")
    for check in verdict.checks:
        print(f"  {check.name:36}{check.status:13}{check.detail}")


def _outcome(
    record: RolloutRecord,
    active: RolloutRecord | None,
    made: set[str] | None = None,
    unfinished: RolloutRecord | None = None,
) -> str:
    """How `record`'s rollout stands; with `made` (the versions ever champion), a promotion decided and never
    carried out (its host stopped, then its finishing failed) says so: the record alone would say promoted."""
    if record.outcome == "promoted" and made is not None and record.version not in made:
        if unfinished is not None and unfinished.version == record.version:
            return "promoted (not carried out: the judge's next run finishes it)"
        return f"promoted (not carried out: never champion; `fashion-mnist promote {record.version}` makes it)"
    if record.outcome:
        return record.outcome.replace("_", " ")
    return "in progress" if active and active.version == record.version else "undecided"


def cmd_promote(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    rollouts = Rollouts(registry)
    record = rollouts.promote(_canary(args, rollouts, "promote"), args.reason, OPERATOR)
    message = f"Canary {record.version} promoted by the operator: {record.reason}"
    print(f"{record.version}'s rollout is decided promoted: it is now the champion of {registry.root}")
    _tell(events.ROLLOUT_PROMOTED, registry.root, message, record.version)


def cmd_abort(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    rollouts = Rollouts(registry)
    record = rollouts.roll_back(_canary(args, rollouts, "abort"), args.reason, OPERATOR)
    message = f"Canary {record.version} rolled back by the operator: {record.reason}"
    print(
        f"{record.version}'s rollout is decided rolled back: no longer the canary of {registry.root}, and the gate "
        f"never promotes it (champion still {registry.champion() or 'none'})"
    )
    _tell(events.ROLLOUT_ROLLED_BACK, registry.root, message, record.version)


def _canary(args: argparse.Namespace, rollouts: Rollouts, verb: str) -> str:
    """The version the operator names, else the active rollout's canary."""
    if args.version:
        return args.version
    if (active := rollouts.active()) is None:
        raise RegistryError(
            f"no rollout in progress in {rollouts.registry.root}: nothing to {verb} "
            "(`fashion-mnist rollout status` lists the recent ones)"
        )
    return active.version


def _tell(event: str, registry: str, message: str, version: str) -> None:
    """The decision's event, for the automations that notify, when a Prefect server is there to hear it."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return  # no server: no automation to tell; the decision is on record in the registry
    try:
        asyncio.run(events.send(event, registry, message, version=version, decided_by="operator"))
    except Exception as exc:  # the decision is made and on record; only the notification failed
        print(f"fashion-mnist: could not send {event} to {PREFECT_API_URL.value()} ({exc})", file=sys.stderr)


def add_commands(commands: argparse._SubParsersAction) -> None:
    rollout = commands.add_parser("rollout", help="the canary rollout: status, or decide it by hand")
    actions = rollout.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="the rollout in progress, its evidence now, and the recent decisions")
    reviews_flag(status)
    status.set_defaults(run=cmd_status)
    for name, run, helps, reason in (
        ("promote", cmd_promote, "make the canary champion now", "promoted by the operator"),
        ("abort", cmd_abort, "roll the canary back; the gate never promotes it", "rolled back by the operator"),
    ):
        action = actions.add_parser(name, help=helps)
        action.add_argument("version", nargs="?", help="the canary (default: the rollout in progress)")
        action.add_argument("--reason", default=reason)
        action.set_defaults(run=run)
