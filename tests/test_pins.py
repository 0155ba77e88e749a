"""The Prefect a new worker host is told to install, and the one prefect.yaml names, are the lock's."""

from __future__ import annotations

import importlib.metadata
import re

import yaml

from tests.helpers import ROOT


def test_every_prefect_pin_names_the_installed_prefect() -> None:
    installed = importlib.metadata.version("prefect")
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"] == installed
    pins = {
        path.relative_to(ROOT).as_posix(): re.findall(r"prefect==([\w.]+)", path.read_text())
        for path in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("tests/*.py")]
    }
    named = {path: found for path, found in pins.items() if found}
    assert named, "the docs show a bare worker host's install"
    assert all(found == [installed] * len(found) for found in named.values()), named
