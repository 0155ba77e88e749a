"""Operators' command line: the registry's versions and champion, and predictions with the champion.

fashion-mnist versions                 list versions, the champion marked
fashion-mnist show v0003               one version's manifest, gate verdict and file check
fashion-mnist promote v0002            make a version champion by hand
fashion-mnist rollback                 make the previous champion the champion again
fashion-mnist promotions               every champion change, in order (the audit log)
fashion-mnist repair-champion          rewrite a damaged champion.json from the audit log
fashion-mnist repair-log               restore lost audit-log entries from what the registry holds
fashion-mnist predict shoe.png ...     classify 28x28 grayscale PNGs with the champion
fashion-mnist serve [--port 8501]      serve the champion (and labeled versions) over TF Serving's REST
                                       and gRPC (8500) APIs, with metrics; follows promotions and labels
fashion-mnist label canary v0007       serve v0007 as the canary beside the champion (--clear: stop)
fashion-mnist labels                   each label and the version it names
fashion-mnist export v0003 [--out D]   a version's SavedModel, as D/3/ (TF Serving's layout); or: champion
fashion-mnist add-batch DIR [--name N] check a batch of new labeled images, add it to the incoming
                                       folder, and announce it (the ad-hoc deployment retrains)
fashion-mnist review [--submit]        the images serve captured (--capture-rate) into review/ by
                                       predicted class; --submit adds the reviewed folder as a batch
fashion-mnist prune-runs               delete run folders the retention setting does not keep
fashion-mnist automations apply        create or update the automations of automations.yaml
fashion-mnist webhook URL              where notifications go (a Prefect block)

--registry, --data-root and --incoming take a folder or an s3://bucket/prefix URL (credentials from
the AWS_* variables). The last four commands talk to the Prefect server PREFECT_API_URL names.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from fmnist.data.cache import normalize
from fmnist.data.dataset import CLASS_NAMES, FASHION_MNIST
from fmnist.data.feedback import feedback_lineage
from fmnist.data.incoming import IncomingBatch, add_batch, known_images
from fmnist.data.overlap import KnownImages
from fmnist.data.png import ImageFileError, model_sized, read_grayscale_png
from fmnist.ops import automations, events
from fmnist.ops.api import API_WAIT_S, ApiUnreachable, wait_for_api
from fmnist.ops.review import IMAGES, ReviewError, compact_records, make_review, submit_review
from fmnist.ops.temporary_server import free_port
from fmnist.ops.worker import WORKER_STOP_S, run_worker
from fmnist.registry.labels import Labels
from fmnist.registry.manifest import FeedbackRecord
from fmnist.registry.retention import RetentionParams, prune_runs
from fmnist.registry.versions import ACKNOWLEDGE, MODEL, NotRegistered, Registry, RegistryError, version_number
from fmnist.serving.edge import EdgeLimits, EdgePlan, behind_edge, nginx_config
from fmnist.serving.options import ServeOptions
from fmnist.storage import StorageError, Store, StoredFile, join
from fmnist.storage import normalize as normalize_location
from fmnist.storage.layout import DataLayout, RunLayout, StorageParams, runs_root, scratch_path
from fmnist.training.export import SERVING_VERSION, export_saved_model
from fmnist.training.model import load_verified_model

DEFAULT_REGISTRY = "artifacts"
EDGE_PREFIX = Path("/run/fmnist-edge")  # where the printed edge configuration keeps nginx's temporary files
PROJECT_FILE = "prefect.yaml"  # how add-batch knows it runs in the project folder, whose data/ the deployments use


def cmd_versions(registry: Registry, args: argparse.Namespace) -> None:
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
        served = {e["version"] for e in registry.promotions()}
    except RegistryError as exc:  # the audit log is damaged: still list the versions
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        served = set()
    print(f"{'':2}{'version':9}{'registered':27}{'test acc':>9}  {'preset':8}decision")
    for version in versions:
        try:
            m = registry.manifest(version)
        except NotRegistered as exc:  # listed, so that the operator sees it, never counted
            print(f"{'':2}{version:9}not a registered version: {exc}")
            continue
        mark = "*" if version == champion else ""
        gate = m.gate
        if not gate.passed:
            decision = f"kept back: {gate.reason}"
        elif version in served or version == champion:
            decision = f"promoted: {gate.reason}"
        else:  # its run stopped before the pointer moved, or another version won the race
            decision = f"passed the gate, never champion: {gate.reason}"
        print(f"{mark:2}{version:9}{m.registered_at:27}{m.metrics.test_accuracy:>9.4f}  {m.params.preset:8}{decision}")
    print(f"\n* champion: {champion or 'none'}")
    try:
        labels = Labels(registry).records()
    except RegistryError as exc:
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        labels = {}
    if labels:
        print("labels: " + ", ".join(f"{name} {record['version']}" for name, record in sorted(labels.items())))


def data_root_of(args: argparse.Namespace) -> str:
    return args.data_root or os.environ.get("FMNIST_DATA_ROOT") or "data"


def cmd_show(registry: Registry, args: argparse.Namespace) -> None:
    damaged = registry.damaged_files(args.version)
    manifest = registry.manifest(args.version)
    recorded = manifest.data.feedback
    if recorded is None:  # registered before versions recorded it: read from the data root's ledgers now
        feedback = DataLayout(normalize_location(data_root_of(args))).feedback
        recorded = FeedbackRecord.of(feedback_lineage(registry.store, feedback, manifest.data.sources.incoming))
    status = {
        "champion": registry.champion() == args.version,
        "folder": str(registry.version_dir(args.version)),
        "files_intact": not damaged,
        "damaged_files": damaged,
        "feedback": recorded.model_dump(),
    }
    print(json.dumps({**status, **manifest.to_json()}, indent=1))


def cmd_promote(registry: Registry, args: argparse.Namespace) -> None:
    registry.promote(args.version, args.reason)
    print(f"{args.version} is now the champion")


def cmd_rollback(registry: Registry, args: argparse.Namespace) -> None:
    replaced = registry.champion()
    restored = registry.rollback(args.reason)
    print(f"{restored} is the champion again (was {replaced})")


def cmd_repair_champion(registry: Registry, args: argparse.Namespace) -> None:
    record = registry.repair_champion()
    print(f"{registry.champion_file} restored from change {record['sequence']} of the audit log: ", end="")
    print(f"{record['version']} is the champion")


def cmd_repair_log(registry: Registry, args: argparse.Namespace) -> None:
    written = registry.repair_log(acknowledge_lost=args.acknowledge_lost)
    for entry in written:
        print(f"change {entry['sequence']} restored ({entry['repair']['evidence']}): ", end="")
        print(f"{entry['event']} {entry['version'] or '(version unknown)'} (was {entry['replaced'] or 'unknown'})")
    print(f"{registry.log_root}: {len(written)} entries restored; `fashion-mnist promotions` lists the log")


def cmd_promotions(registry: Registry, args: argparse.Namespace) -> None:
    entries = registry.promotions()
    if not entries:
        print(f"No champion changes in {registry.root}")
    for entry in entries:
        repaired = f"  [restored by repair-log at {entry['repair']['at']}]" if entry.get("repair") else ""
        print(
            f"{entry['sequence']:>4}  {entry['at'] or '(time lost)'}  {entry['event']:9}{entry['version'] or '?':8}"
            f"(was {entry['replaced'] or 'none'})  {entry['reason']}{repaired}"
        )


def cmd_predict(registry: Registry, args: argparse.Namespace) -> None:
    images = [model_sized(read_grayscale_png(path), path) for path in args.images]
    model = load_verified_model(registry.store, registry.champion_model())
    batch = np.stack(images)
    probabilities = model.predict(normalize(batch).reshape(batch.shape), verbose=0)
    print(f"champion {registry.champion()}")
    for path, row in zip(args.images, probabilities, strict=True):
        best = int(row.argmax())
        print(f"{path}\t{CLASS_NAMES[best]}\t{row[best]:.3f}")


def cmd_serve(registry: Registry, args: argparse.Namespace) -> None:
    from fmnist.serving.server import serve

    options = ServeOptions(
        host=args.host,
        port=args.port,
        grpc_port=None if args.no_grpc else args.grpc_port,
        poll_s=args.poll_s,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        max_body_mib_in_flight=args.max_body_mib_in_flight,
        parse_workers=args.parse_workers,
        canary_share=args.canary_share,
        shadow_share=args.shadow_share,
        feedback_root=DataLayout(normalize_location(data_root_of(args))).feedback,
        capture_rate=args.capture_rate,
        capture_below=args.capture_below,
        capture_flush_s=args.capture_flush_s,
        access_log=args.access_log,
    )
    edge = EdgePlan(EdgeLimits.of(options), free_port(), free_port())
    if args.print_edge_config:
        print(nginx_config(behind_edge(options, edge)[1], EDGE_PREFIX, edge.limits))
        return
    serve(registry, options, edge if args.edge else None)


def cmd_label(registry: Registry, args: argparse.Namespace) -> None:
    labels = Labels(registry)
    if args.clear:
        damage = labels.clear(args.label)
        if damage:
            print(f"{labels.file} was damaged; removed what could not be read: {'; '.join(damage)}")
        print(f"label {args.label!r} removed: servers stop serving it within their poll interval")
    elif args.version is None:
        raise RegistryError("name a version to label (fashion-mnist label canary v0007), or --clear")
    else:
        labels.set(args.label, args.version, args.reason)
        print(f"{args.version} is {args.label!r}: servers load it (verified) within their poll interval")


def cmd_labels(registry: Registry, args: argparse.Namespace) -> None:
    champion = registry.champion()
    print(f"stable\t{champion or '-'}\tthe champion")
    for label, record in sorted(Labels(registry).records().items()):
        print(f"{label}\t{record['version']}\t{record.get('reason', '')} ({record.get('at', '')})")


def cmd_export(registry: Registry, args: argparse.Namespace) -> None:
    version = registry.champion() if args.version == "champion" else args.version
    if version is None:
        raise RegistryError(f"no champion in {registry.root} to export")
    manifest = registry.manifest(version)
    number = str(version_number(version))
    out = args.out / number
    staging = args.out / f".{number}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    prefix = f"{RunLayout.SAVED_MODEL}/{SERVING_VERSION}/"
    exported = [name for name in manifest.files if name.startswith(prefix)]
    for name in exported:
        registry.store.fetch(registry.file(version, name), staging / name.removeprefix(prefix))
    if not exported:  # registered before versions held their export: made from the verified model
        export_saved_model(load_verified_model(registry.store, registry.file(version, MODEL)), staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"{version}'s SavedModel is in {out}: TF Serving serves it as version {number} of the model in {args.out}")


def deployed_storage(args: argparse.Namespace, project: Path) -> tuple[StorageParams, str]:
    """The storage `add-batch` adds to, and where that came from: the flags, else the FMNIST_DATA_ROOT and
    FMNIST_REGISTRY_ROOT variables (the cluster deployments'), else the project folder's `data/` and
    `artifacts/` (the single-host deployments') when run from it. Anywhere else it refuses: a batch
    added to a folder no deployment reads would never be trained on."""
    data_root = args.data_root or os.environ.get("FMNIST_DATA_ROOT") or None
    registry_root = args.registry or os.environ.get("FMNIST_REGISTRY_ROOT") or None
    source = "--data-root / --registry, or FMNIST_DATA_ROOT / FMNIST_REGISTRY_ROOT"
    if data_root is None or registry_root is None:
        if not (project / PROJECT_FILE).is_file():
            raise ValueError(
                f"{project} is not the project folder (no {PROJECT_FILE}): say which storage the deployments use "
                "with --data-root and --registry (or FMNIST_DATA_ROOT and FMNIST_REGISTRY_ROOT), or run from "
                "the project folder"
            )
        data_root = data_root or str(project / "data")
        registry_root = registry_root or str(project / DEFAULT_REGISTRY)
        source = f"the project folder {project}"
    storage = StorageParams(
        data_root=data_root, registry_root=registry_root, incoming_dir=args.incoming, scratch_dir=args.scratch
    )
    return storage, source


def cmd_add_batch(registry: Registry, args: argparse.Namespace) -> None:
    storage, source = deployed_storage(args, Path.cwd())
    print(f"Adding to {storage.incoming} (registry {storage.registry}; from {source})")
    store = registry.store
    known = known_test_and_train(store, storage)
    batch = add_batch(store, args.folder, storage.incoming, args.name, known)
    print(f"Added batch {batch.name}: {batch.rows} {batch.kind} images, at {batch.path}")
    announce(batch, storage)


def known_test_and_train(store: Store, storage: StorageParams) -> KnownImages | None:
    """The canonical images a batch must not copy, once a run has verified them into the data root: the
    files the champion was trained and tested on (a deployment may pin other files than Fashion-MNIST's),
    else Fashion-MNIST's own."""
    registry = Registry(store, storage.registry)
    hashes = [f.sha256 for f in (FASHION_MNIST.train_images, FASHION_MNIST.test_images)]
    if champion := registry.champion():
        canonical = registry.manifest(champion).data.sources.canonical
        if len(canonical) == 4:  # train images, train labels, test images, test labels
            hashes = [canonical[0], canonical[2]]
    names = (FASHION_MNIST.train_images.raw_name, FASHION_MNIST.test_images.raw_name)
    train, test = (StoredFile(join(storage.data.raw, name), sha256) for name, sha256 in zip(names, hashes, strict=True))
    if not store.exists(test.location):
        print(f"No verified test set in {storage.data.raw} yet: the first run checks the batch for test-set images")
        return None
    return known_images(store, test, train)


def announce(batch: IncomingBatch, storage: StorageParams) -> None:
    """Send the batch event that starts a retrain, when a Prefect server is there to hear it."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("No Prefect server (PREFECT_API_URL is not set): no retrain started; the next scheduled run includes it")
        return
    try:
        asyncio.run(events.announce_batch(batch, storage))
    except Exception as exc:  # the batch is in; only the announcement failed
        print(
            f"fashion-mnist: could not announce the batch to {PREFECT_API_URL.value()} ({exc}); "
            "no retrain started: the next scheduled run includes it, or run make retrain-now",
            file=sys.stderr,
        )
        return
    print(f"Announced it ({events.BATCH_ADDED}): the ad-hoc deployment retrains once batches stop arriving")


def cmd_review(registry: Registry, args: argparse.Namespace) -> None:
    storage, _ = deployed_storage(args, Path.cwd())
    feedback = storage.data.feedback
    if not args.submit:
        offered = make_review(registry.store, feedback, args.out)
        if not offered.images:
            print(f"No captured images of {feedback} wait for review")
            return
        more = f"; {offered.left} more wait for the next review" if offered.left else ""
        print(f"{offered.images} captured images from {feedback} are in {offered.folder}{more}")
        print(
            f"Move each wrong one to its class's folder under {args.out / IMAGES} (or delete it), then: review --submit"
        )
        return
    known = known_test_and_train(registry.store, storage)
    done = submit_review(registry.store, feedback, args.out, storage.incoming, args.name, known)
    batch, ledger = done.batch, done.ledger
    print(
        f"{'Batch ' + batch.name + ' was added by an earlier submit' if done.earlier else 'Added batch ' + batch.name}"
        f" to {storage.incoming}: {ledger.submitted} reviewed images "
        f"({ledger.relabeled} relabeled, {ledger.deleted} deleted), served by "
        + ", ".join(f"{v} ({n})" for v, n in sorted(ledger.served_versions.items()))
    )
    announce(batch, storage)  # again for a finished earlier submit: it may have stopped before announcing
    try:
        freed = compact_records(registry.store, feedback)
    except (ReviewError, StorageError) as exc:  # the batch is in; only the clean-up failed
        print(f"fashion-mnist: could not free the reviewed records' space: {exc}", file=sys.stderr)
        return
    print(
        f"Freed {freed.records_freed} reviewed records of {feedback} (the batch holds their images, the ledger "
        f"their records); {freed.files_after} record files hold the rest"
    )


def cmd_prune_runs(registry: Registry, args: argparse.Namespace) -> None:
    retention = RetentionParams(keep_last=args.keep_last, keep_days=args.keep_days)
    runs = runs_root(registry.root)
    deleted = prune_runs(registry, runs, retention, keep=set())
    print(f"Deleted {len(deleted)} run folders from {runs}: {', '.join(deleted) or 'none'}")


def cmd_automations_apply(registry: Registry, args: argparse.Namespace) -> None:
    applied = automations.apply(args.file, args.heartbeat_s, args.start_window_s)
    for verb in ("created", "updated", "deleted"):
        for name in getattr(applied, verb):
            print(f"{verb:8} {name}")
    if applied.skipped:
        print(
            f"left out (no webhook block {automations.WEBHOOK_BLOCK!r}: make webhook WEBHOOK_URL=...): "
            + ", ".join(applied.skipped)
        )


def cmd_webhook(registry: Registry, args: argparse.Namespace) -> None:
    block_id = automations.configure_webhook(args.url)
    print(
        f"Notifications go to the webhook block {automations.WEBHOOK_BLOCK!r} ({block_id}); run make deploy "
        "(or fashion-mnist automations apply) to connect the automations to it"
    )


def cmd_wait_for_api(registry: Registry, args: argparse.Namespace) -> None:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ValueError("PREFECT_API_URL is not set: start a server (make server) and point it there")
    tries = wait_for_api(url, args.timeout_s, say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"the Prefect API at {url} answers" + (f" (try {tries})" if tries > 1 else ""))


def cmd_worker(registry: Registry, args: argparse.Namespace) -> None:
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    raise SystemExit(run_worker(args.pool, extra, stop_within_s=args.stop_within_s))


def bounded(kind: type, low: float, high: float):
    """An argparse type: a finite number of `kind` from `low` to `high`, or a usage error that says so."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not low <= value <= high:  # also refuses nan, and inf beyond `high`
            raise argparse.ArgumentTypeError(f"{text} is not between {low:g} and {high:g}")
        return value

    return parse


def data_root_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--data-root",
        default=None,
        help="the deployments' data root (default: FMNIST_DATA_ROOT, or data/ when run in the project folder)",
    )
    command.add_argument("--incoming", default=None, help="the incoming folder (default: <data root>/incoming)")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="fashion-mnist", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    main.add_argument(
        "--registry",
        default=None,
        help=f"registry root: a folder or s3://bucket/prefix (default: {DEFAULT_REGISTRY}; for add-batch, "
        "FMNIST_REGISTRY_ROOT or the project folder's)",
    )
    main.add_argument(
        "--scratch", default=None, help="local folder for verified copies of s3:// files (default: ~/.cache/...)"
    )
    commands = main.add_subparsers(dest="command", required=True)
    commands.add_parser("versions", help="list versions").set_defaults(run=cmd_versions)
    show = commands.add_parser("show", help="one version in full")
    show.add_argument("version")
    show.add_argument(
        "--data-root", default=None, help="whose feedback reviews to read (default: FMNIST_DATA_ROOT, or data/)"
    )
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
    predict = commands.add_parser("predict", help="classify PNG files with the champion")
    predict.add_argument("images", nargs="+", type=Path)
    predict.set_defaults(run=cmd_predict)
    serve = commands.add_parser("serve", help="serve the champion over HTTP (TF Serving's REST API)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    defaults = ServeOptions()
    serve.add_argument("--port", type=bounded(int, 0, 65535), default=defaults.port, help="REST; TF Serving's port")
    serve.add_argument(
        "--grpc-port", type=bounded(int, 0, 65535), default=defaults.grpc_port, help="gRPC; TF Serving's port"
    )
    serve.add_argument("--no-grpc", action="store_true", help="serve REST only")
    serve.add_argument(
        "--poll-s",
        type=bounded(float, 0.05, 3600),
        default=defaults.poll_s,
        help="how often the champion pointer and the labels are read",
    )
    serve.add_argument(
        "--max-connections",
        type=bounded(int, 1, 65536),
        default=defaults.max_connections,
        help="connections at once; beyond it a 503 (bounds memory)",
    )
    serve.add_argument(
        "--header-timeout-s",
        type=bounded(float, 0.1, 600),
        default=defaults.header_timeout_s,
        help="for a request's head, from its first byte; then a 408 and the connection closed",
    )
    serve.add_argument(
        "--body-timeout-s",
        type=bounded(float, 0.1, 3600),
        default=defaults.body_timeout_s,
        help="for a request's body, from its head; then a 408 and the connection closed",
    )
    serve.add_argument(
        "--max-body-mib-in-flight",
        type=bounded(int, 1, 1 << 16),
        default=defaults.max_body_mib_in_flight,
        help="MiB of request bodies held at once, across requests; beyond it a 429",
    )
    serve.add_argument(
        "--parse-workers",
        type=bounded(int, 0, 64),
        default=defaults.parse_workers,
        help="processes that parse big bodies off the event loop (0: on it)",
    )
    serve.add_argument(
        "--canary-share",
        type=bounded(float, 0, 1),
        default=defaults.canary_share,
        help="share of the requests naming no version or label that the canary answers",
    )
    serve.add_argument(
        "--shadow-share",
        type=bounded(float, 0, 1),
        default=defaults.shadow_share,
        help="share of stable's requests also sent to the canary, to count how often the two agree",
    )
    serve.add_argument(
        "--capture-rate",
        type=bounded(float, 0, 1),
        default=defaults.capture_rate,
        help="share of answered images kept for review in <data root>/feedback (default: none)",
    )
    serve.add_argument(
        "--capture-below",
        type=bounded(float, 0, 1),
        default=defaults.capture_below,
        help="images whose top probability is under this are always kept (default: none)",
    )
    serve.add_argument(
        "--capture-flush-s",
        type=bounded(float, 1, 3600),
        default=defaults.capture_flush_s,
        help="longest a captured image waits for a file's worth before a smaller file is written "
        "(default: %(default)s s)",
    )
    serve.add_argument(
        "--data-root",
        default=None,
        help="where captured feedback goes, under feedback/ (default: FMNIST_DATA_ROOT, or data/)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--edge",
        action="store_true",
        help="put nginx in front (the host and ports above become its; the server listens behind it on loopback)",
    )
    serve.add_argument(
        "--print-edge-config", action="store_true", help="print the edge's nginx configuration for these options; exit"
    )
    serve.set_defaults(run=cmd_serve)
    label = commands.add_parser("label", help="serve a version under a label beside the champion (canary)")
    label.add_argument("label", help="canary, or another name (stable is the champion's)")
    label.add_argument("version", nargs="?", help="v0007")
    label.add_argument("--clear", action="store_true", help="remove the label")
    label.add_argument("--reason", default="labeled by the operator")
    label.set_defaults(run=cmd_label)
    commands.add_parser("labels", help="each label and the version it names").set_defaults(run=cmd_labels)
    export = commands.add_parser("export", help="write a version's TensorFlow SavedModel for TF Serving")
    export.add_argument("version", help="v0003, or champion")
    export.add_argument("--out", type=Path, default=Path("models/fashion-mnist"), help="the model's base path")
    export.add_argument(
        "--format", choices=["saved_model"], default="saved_model", help="SavedModel only (see the README on ONNX)"
    )
    export.set_defaults(run=cmd_export)
    add = commands.add_parser("add-batch", help="check a batch and add it to the incoming folder")
    add.add_argument("folder", type=Path, help="an IDX pair, or PNG images in one folder per class")
    add.add_argument("--name", help="the batch's name in the incoming folder (default: the folder's name)")
    data_root_flags(add)
    add.set_defaults(run=cmd_add_batch)
    review = commands.add_parser("review", help="captured feedback into a folder to review; --submit adds it")
    review.add_argument("--out", type=Path, default=Path("review"), help="the review folder (default: review/)")
    review.add_argument("--submit", action="store_true", help="add the reviewed folder as a batch, and retrain")
    review.add_argument("--name", help="the batch's name (default: feedback-<time>)")
    data_root_flags(review)
    review.set_defaults(run=cmd_review)
    prune = commands.add_parser("prune-runs", help="delete run folders beyond the retention setting")
    prune.add_argument("--keep-last", type=bounded(int, 1, 100_000), default=RetentionParams().keep_last)
    prune.add_argument("--keep-days", type=bounded(float, 0, 36_500), default=RetentionParams().keep_days)
    prune.set_defaults(run=cmd_prune_runs)
    auto = commands.add_parser("automations", help="the pipeline's Prefect automations")
    auto_commands = auto.add_subparsers(dest="action", required=True)
    apply = auto_commands.add_parser("apply", help="create or update the automations of a file, by name")
    apply.add_argument("--file", type=Path, default=Path("automations.yaml"))
    apply.add_argument(
        "--heartbeat-s",
        type=bounded(int, automations.MIN_HEARTBEAT_S, automations.MAX_HEARTBEAT_S),
        default=60,
        help="the flow runs' heartbeat interval (Prefect's minimum is 30 s)",
    )
    apply.add_argument(
        "--start-window-s",
        type=bounded(int, automations.MIN_START_WINDOW_S, automations.MAX_HEARTBEAT_S),
        default=automations.START_WINDOW_S,
        help="a run handed to a worker that has not started this long after is marked Crashed",
    )
    apply.set_defaults(run=cmd_automations_apply)
    webhook = commands.add_parser("webhook", help="set the URL notifications are POSTed to")
    webhook.add_argument("url")
    webhook.set_defaults(run=cmd_webhook)
    wait = commands.add_parser("wait-for-api", help="wait, trying visibly, until the Prefect API answers")
    wait.add_argument(
        "--timeout-s", type=bounded(float, 0, 3600), default=API_WAIT_S, help="give up after this long, naming the URL"
    )
    wait.set_defaults(run=cmd_wait_for_api)
    worker = commands.add_parser(
        "worker", help="a Prefect process worker that, stopped with SIGTERM or Ctrl-C, hands its runs back"
    )
    worker.add_argument("--pool", required=True, help="the work pool to serve")
    worker.add_argument(
        "--stop-within-s",
        type=bounded(float, 5, 3600),
        default=WORKER_STOP_S,
        help="once told to stop, exit within this long whatever the API's state, naming the runs not handed back",
    )
    worker.add_argument("extra", nargs=argparse.REMAINDER, help="-- then more `prefect worker start` options")
    worker.set_defaults(run=cmd_worker)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        # Only the registry: the commands that also write data (add-batch) check every root together.
        registry = Registry(
            Store(scratch=scratch_path(args.scratch)), normalize_location(args.registry or DEFAULT_REGISTRY)
        )
        args.run(registry, args)
    except (RegistryError, ImageFileError, StorageError, FileNotFoundError, ValueError, ApiUnreachable) as exc:
        print(f"fashion-mnist: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
