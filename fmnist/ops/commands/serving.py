"""Serving's commands: predict, serve, label, labels, export."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fmnist.data.cache import normalize
from fmnist.data.dataset import CLASS_NAMES
from fmnist.data.png import model_sized, read_grayscale_png
from fmnist.ops.commands.roots import feedback_root, registry_of
from fmnist.ops.flags import add_model_flags, model_from_flags
from fmnist.ops.temporary_server import free_port
from fmnist.registry.export import export_for_tf_serving
from fmnist.registry.labels import Labels
from fmnist.registry.versions import RegistryError
from fmnist.serving.edge import EdgeLimits, EdgePlan, behind_edge, nginx_config
from fmnist.serving.options import ServeOptions
from fmnist.training.model import load_verified_model

EDGE_PREFIX = Path("/run/fmnist-edge")  # where the printed edge configuration keeps nginx's temporary files


def cmd_predict(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    images = [model_sized(read_grayscale_png(path), path) for path in args.images]
    model = load_verified_model(registry.store, registry.champion_model())
    batch = np.stack(images)
    probabilities = model.predict(normalize(batch).reshape(batch.shape), verbose=0)
    print(f"champion {registry.champion()}")
    for path, row in zip(args.images, probabilities, strict=True):
        best = int(row.argmax())
        print(f"{path}\t{CLASS_NAMES[best]}\t{row[best]:.3f}")


def cmd_serve(args: argparse.Namespace) -> None:
    from fmnist.serving.server import serve

    registry = registry_of(args)
    options = model_from_flags(ServeOptions, args, feedback_root=feedback_root(args))
    edge = EdgePlan(EdgeLimits.of(options), free_port(), free_port())
    if args.print_edge_config:
        print(nginx_config(behind_edge(options, edge)[1], EDGE_PREFIX, edge.limits))
        return
    serve(registry, options, edge if args.edge else None)


def cmd_label(args: argparse.Namespace) -> None:
    labels = Labels(registry_of(args))
    if args.clear:
        damage = labels.clear(args.label)
        if damage:
            print(f"{labels.file} was damaged; removed what could not be read: {'; '.join(damage)}")
        print(f"label {args.label!r} removed from {labels.file}: servers stop serving it within their poll interval")
    elif args.version is None:
        raise RegistryError("name a version to label (fashion-mnist label canary v0007), or --clear")
    else:
        labels.set(args.label, args.version, args.reason)
        where = f"{args.version} is {args.label!r} in {labels.file}"
        print(f"{where}: servers load it (verified) within their poll interval")


def cmd_labels(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    champion = registry.champion()
    print(f"stable\t{champion or '-'}\tthe champion")
    for label, record in sorted(Labels(registry).records().items()):
        print(f"{label}\t{record['version']}\t{record.get('reason', '')} ({record.get('at', '')})")


def cmd_export(args: argparse.Namespace) -> None:
    registry = registry_of(args)
    version = registry.champion() if args.version == "champion" else args.version
    if version is None:
        raise RegistryError(f"no champion in {registry.root} to export")
    out = export_for_tf_serving(registry, version, args.out)
    print(f"{version}'s SavedModel is in {out}: TF Serving serves it as version {out.name} of the model in {args.out}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="classify PNG files with the champion")
    predict.add_argument("images", nargs="+", type=Path)
    predict.set_defaults(run=cmd_predict)
    serve = commands.add_parser("serve", help="serve the champion over HTTP (TF Serving's REST API)")
    add_model_flags(serve, ServeOptions)
    serve.add_argument(
        "--data-root",
        default=None,
        help="where captured feedback goes, under feedback/ (default: FMNIST_DATA_ROOT, or data/)",
    )
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
        "--format",
        choices=["saved_model"],
        default="saved_model",
        help="SavedModel only (why not ONNX: the docs site, Serving)",
    )
    export.set_defaults(run=cmd_export)
