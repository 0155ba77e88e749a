"""The registry's commands: versions, show, promote, rollback, promotions, repair-champion, repair-log."""

from __future__ import annotations

import argparse
import json
import sys

from fmnist.data.feedback import feedback_lineage
from fmnist.ops.commands.roots import feedback_root, registry_of, reviews_flag
from fmnist.registry.labels import Labels
from fmnist.registry.log_repair import repair_champion, repair_log
from fmnist.registry.manifest import FeedbackRecord
from fmnist.registry.rollout import Rollouts
from fmnist.registry.status import version_status
from fmnist.registry.versions import ACKNOWLEDGE, NotRegistered, RegistryError


def cmd_versions(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    try:
        champion = registry.champion()
    except RegistryError as exc:  # still list the versions: the operator needs them to repair it
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        champion = "damaged"
    versions = registry.versions()
    if not versions:
        print(f"No versions in {registry.root}")
        return
    try:
        ever_champion = {e["version"] for e in registry.promotions()}
    except RegistryError as exc:  # the audit log is damaged: still list the versions
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        ever_champion = set()
    try:
        rollouts = {record.version: record for record in Rollouts(registry).status()}
    except RegistryError as exc:  # a damaged rollout record: still list the versions
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        rollouts = {}
    print(f"{'':2}{'version':9}{'registered':27}{'test acc':>9}  {'preset':8}decision")
    for version in versions:
        try:
            m = registry.manifest(version)
        except NotRegistered as exc:  # listed, so that the operator sees it, never counted
            print(f"{'':2}{version:9}not a registered version: {exc}")
            continue
        mark = "*" if version == champion else ""
        decision = version_status(version, m.gate, champion, ever_champion, rollouts.get(version))
        print(f"{mark:2}{version:9}{m.registered_at:27}{m.metrics.test_accuracy:>9.4f}  {m.params.preset:8}{decision}")
    print(f"\n* champion: {champion or 'none'}")
    try:
        labels = Labels(registry).records()
    except RegistryError as exc:
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        labels = {}
    if labels:
        print("labels: " + ", ".join(f"{name} {record['version']}" for name, record in sorted(labels.items())))


def cmd_show(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    damaged = registry.damaged_files(args.version)
    manifest = registry.manifest(args.version)
    recorded = manifest.data.feedback
    if recorded is None:  # registered before versions recorded it: read from the data root's ledgers now
        feedback = feedback_lineage(registry.store, feedback_root(args), manifest.data.sources.incoming)
        recorded = FeedbackRecord.of(feedback)
    status = {
        "champion": registry.champion() == args.version,
        "folder": str(registry.version_dir(args.version)),
        "files_intact": not damaged,
        "damaged_files": damaged,
        "feedback": recorded.model_dump(),
    }
    print(json.dumps({**status, **manifest.to_json()}, indent=1))


def cmd_promote(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    registry.promote(args.version, args.reason)
    print(f"{args.version} is now the champion of {registry.root}")


def cmd_rollback(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    replaced = registry.champion()
    restored = registry.rollback(args.reason)
    print(f"{restored} is the champion of {registry.root} again (was {replaced})")


def cmd_promotions(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    entries = registry.promotions()
    if not entries:
        print(f"No champion changes in {registry.root}")
    for entry in entries:
        repaired = f"  [restored by repair-log at {entry['repair']['at']}]" if entry.get("repair") else ""
        print(
            f"{entry['sequence']:>4}  {entry['at'] or '(time lost)'}  {entry['event']:9}{entry['version'] or '?':8}"
            f"(was {entry['replaced'] or 'none'})  {entry['reason']}{repaired}"
        )


def cmd_repair_champion(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    record = repair_champion(registry)
    print(f"{registry.champion_file} restored from change {record['sequence']} of the audit log: ", end="")
    print(f"{record['version']} is the champion")


def cmd_repair_log(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    written = repair_log(registry, acknowledge_lost=args.acknowledge_lost)
    for entry in written:
        print(f"change {entry['sequence']} restored ({entry['repair']['evidence']}): ", end="")
        print(f"{entry['event']} {entry['version'] or '(version unknown)'} (was {entry['replaced'] or 'unknown'})")
    print(f"{registry.log_root}: {len(written)} entries restored; `fashion-mnist promotions` lists the log")


def add_commands(commands: argparse._SubParsersAction) -> None:
    commands.add_parser("versions", help="list versions").set_defaults(run=cmd_versions)
    show = commands.add_parser("show", help="one version in full")
    show.add_argument("version")
    reviews_flag(show)
    show.set_defaults(run=cmd_show)
    promote = commands.add_parser("promote", help="make a version champion")
    promote.add_argument("version")
    promote.add_argument("--reason", default="promoted by the operator")
    promote.set_defaults(run=cmd_promote)
    rollback = commands.add_parser("rollback", help="restore the previous champion")
    rollback.add_argument("--reason", default="rolled back by the operator")
    rollback.set_defaults(run=cmd_rollback)
    commands.add_parser("promotions", help="every champion change").set_defaults(run=cmd_promotions)
    commands.add_parser(
        "repair-champion", help="rewrite a damaged champion.json from the audit log's last entry"
    ).set_defaults(run=cmd_repair_champion)
    repair_log = commands.add_parser(
        "repair-log", help="restore missing or damaged audit-log entries from what the registry still holds"
    )
    repair_log.add_argument(
        ACKNOWLEDGE,
        action="store_true",
        help="record changes the evidence cannot settle as lost (what is known of them kept)",
    )
    repair_log.set_defaults(run=cmd_repair_log)
