"""The storage roots a run writes in never overlap: checked when the parameters are validated, before a run
starts, on disk and in a bucket. With the incoming folder set to the registry root and bad batches
quarantined, one run moved champion.json away, the next versions/ and the audit log, and then v0001 was
registered again for a different model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fmnist.storage.layout import StorageParams


@pytest.fixture(params=["local", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path) if request.param == "local" else "s3://team-bucket/fmnist"


def storage(base: str, tmp_path: Path, **roots: str) -> StorageParams:
    defaults = {"data_root": f"{base}/data", "registry_root": f"{base}/artifacts"}
    return StorageParams(**{**defaults, **roots}, scratch_dir=str(tmp_path / "scratch"))


@pytest.mark.parametrize(
    ("roots", "first", "second"),
    [
        ({"incoming_dir": "{b}/artifacts"}, "incoming_dir", "registry_root"),
        ({"incoming_dir": "{b}/artifacts/versions"}, "incoming_dir", "registry_root"),
        ({"incoming_dir": "{b}"}, "<data_root>/raw", "incoming_dir"),
        ({"incoming_dir": "{b}/data"}, "<data_root>/raw", "incoming_dir"),
        ({"incoming_dir": "{b}/data/cache/x"}, "<data_root>/cache", "incoming_dir"),
        ({"incoming_dir": "{b}/data/quarantine"}, "incoming_dir", "<data_root>/quarantine"),
        ({"registry_root": "{b}/data"}, "data_root", "registry_root"),
        ({"registry_root": "{b}/data/models"}, "data_root", "registry_root"),
        ({"registry_root": "{b}"}, "data_root", "registry_root"),
        ({"data_root": "{b}/artifacts/data"}, "data_root", "registry_root"),
    ],
)
def test_overlapping_roots_are_refused_naming_both(
    base: str, tmp_path: Path, roots: dict[str, str], first: str, second: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        storage(base, tmp_path, **{k: v.format(b=base) for k, v in roots.items()})
    message = str(refused.value)
    assert f"{first} (" in message and f"{second} (" in message and "neither inside the other" in message


def test_the_filesystem_root_and_an_empty_root_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"incoming_dir \(/\)"):
        StorageParams(data_root=str(tmp_path / "data"), registry_root=str(tmp_path / "a"), incoming_dir="/")
    with pytest.raises(ValidationError, match="an empty location"):
        StorageParams(data_root="", registry_root=str(tmp_path / "a"))
    with pytest.raises(ValidationError, match="scratch_dir"):
        StorageParams(data_root=str(tmp_path / "data"), registry_root=str(tmp_path / "a"), scratch_dir=str(tmp_path))


def test_a_folder_reached_through_a_link_is_the_folder(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "artifacts")
    with pytest.raises(ValidationError, match=r"incoming_dir .* is registry_root"):
        storage(str(tmp_path), tmp_path, incoming_dir=str(tmp_path / "link"))


def test_separate_roots_are_accepted(base: str, tmp_path: Path) -> None:
    assert storage(base, tmp_path).incoming == f"{storage(base, tmp_path).data.root}/incoming"
    assert storage(base, tmp_path, incoming_dir=f"{base}/drop-box").incoming.endswith("/drop-box")
    # Names that share a prefix but not a folder: artifacts-2 is not inside artifacts.
    assert storage(base, tmp_path, incoming_dir=f"{base}/artifacts-2").registry.endswith("/artifacts")
    assert (
        storage(base, tmp_path, registry_root="s3://another-bucket/artifacts").registry
        == "s3://another-bucket/artifacts"
    )
