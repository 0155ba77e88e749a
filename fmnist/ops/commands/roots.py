"""Where a command's storage is, by one rule for every command: each root is its flag (--data-root,
--registry), else its variable (FMNIST_DATA_ROOT, FMNIST_REGISTRY_ROOT: the cluster deployments'), else
data/ and artifacts/ in the current folder (the single-host deployments', run from the project folder).
The commands that add data for the deployments to train on (add-batch, review) take that last default only
in the project folder: a batch added to a folder no deployment reads would never be trained on."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fmnist.registry.versions import Registry
from fmnist.storage import Store, normalize
from fmnist.storage.layout import DataLayout, StorageParams, scratch_path

DEFAULT_DATA_ROOT = "data"
DEFAULT_REGISTRY = "artifacts"
PROJECT_FILE = "prefect.yaml"  # how a command knows it runs in the project folder, whose data/ the deployments use


def given(args: argparse.Namespace, flag: str, variable: str) -> str | None:
    """A root as its flag, else its variable, gives it."""
    if flagged := getattr(args, flag):
        return flagged
    value = os.environ.get(variable)
    if value and not value.strip():
        raise ValueError(f"{variable} is blank: unset it, or set it to a folder or an s3://bucket/prefix URL")
    return value or None


def data_root(args: argparse.Namespace) -> str:
    return given(args, "data_root", "FMNIST_DATA_ROOT") or DEFAULT_DATA_ROOT


def feedback_root(args: argparse.Namespace) -> str:
    """Where serve keeps captured records, and show reads what became of them: under the data root."""
    return DataLayout(normalize(data_root(args))).feedback


def reviews_flag(command: argparse.ArgumentParser) -> None:
    """--data-root for a command that reads what reviewers labeled (`feedback_root`)."""
    command.add_argument(
        "--data-root", default=None, help="whose feedback reviews to read (default: FMNIST_DATA_ROOT, or data/)"
    )


def registry_root(args: argparse.Namespace) -> str:
    return given(args, "registry", "FMNIST_REGISTRY_ROOT") or DEFAULT_REGISTRY


def registry_of(args: argparse.Namespace) -> Registry:
    """Only the registry: the commands that also write data (add-batch, review) check every root together."""
    return Registry(Store(scratch=scratch_path(args.scratch)), normalize(registry_root(args)))


def deployed_storage(args: argparse.Namespace, project: Path) -> tuple[StorageParams, str]:
    """The storage add-batch and review add to, and where that came from: the roots in full (a retrain that
    the batch's event starts reads them elsewhere); the defaults only when `project` is the project folder."""
    data, registry = given(args, "data_root", "FMNIST_DATA_ROOT"), given(args, "registry", "FMNIST_REGISTRY_ROOT")
    source = "--data-root / --registry, or FMNIST_DATA_ROOT / FMNIST_REGISTRY_ROOT"
    if data is None or registry is None:
        if not (project / PROJECT_FILE).is_file():
            raise ValueError(
                f"{project} is not the project folder (no {PROJECT_FILE}): say which storage the deployments use "
                "with --data-root and --registry (or FMNIST_DATA_ROOT and FMNIST_REGISTRY_ROOT), or run from "
                "the project folder"
            )
        data, registry = data or str(project / DEFAULT_DATA_ROOT), registry or str(project / DEFAULT_REGISTRY)
        source = f"the project folder {project}"
    storage = StorageParams(
        data_root=data, registry_root=registry, incoming_dir=args.incoming, scratch_dir=args.scratch
    )
    return storage, source
