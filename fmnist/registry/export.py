"""A version's SavedModel written out in TF Serving's layout, `<base>/<version number>/`."""

from __future__ import annotations

import shutil
from pathlib import Path

from fmnist.registry.versions import MODEL, Registry, version_number
from fmnist.storage.layout import RunLayout
from fmnist.training.export import SERVING_VERSION, export_saved_model
from fmnist.training.model import load_verified_model


def export_for_tf_serving(registry: Registry, version: str, base: Path) -> Path:
    """Write `version`'s SavedModel to `base/<number>/` (replacing what is there) and return that folder.
    It is written to a hidden staging folder first, so TF Serving, which watches `base`, never loads half."""
    manifest = registry.manifest(version)
    number = str(version_number(version))
    out = base / number
    staging = base / f".{number}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    prefix = f"{RunLayout.SAVED_MODEL}/{SERVING_VERSION}/"
    exported = [name for name in manifest.files if name.startswith(prefix)]
    for name in exported:
        registry.store.fetch(registry.file(version, name), staging / name.removeprefix(prefix))
    if not exported:  # registered before versions held their export: made from the verified model
        export_saved_model(load_verified_model(registry.store, registry.file(version, MODEL)), staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
