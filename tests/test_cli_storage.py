"""One rule for where every command's storage is (fmnist/ops/commands/roots.py): the flag, else the FMNIST_*
variable, else data/ and artifacts/ here; add-batch and review take that last only in the project folder."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from fmnist.ops import cli
from fmnist.ops.commands.roots import data_root, deployed_storage, feedback_root, registry_of, registry_root
from fmnist.storage import Store
from tests.feedback_helpers import captured
from tests.helpers import synthetic_images


def flags(**given: str | None) -> argparse.Namespace:
    return argparse.Namespace(**{"data_root": None, "registry": None, "incoming": None, "scratch": None, **given})


@pytest.fixture
def no_variables(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("FMNIST_DATA_ROOT", raising=False)
    monkeypatch.delenv("FMNIST_REGISTRY_ROOT", raising=False)
    return monkeypatch


def test_each_root_is_its_flag_else_its_variable_else_the_default(no_variables: pytest.MonkeyPatch) -> None:
    assert (data_root(flags()), registry_root(flags())) == ("data", "artifacts")
    no_variables.setenv("FMNIST_DATA_ROOT", "s3://b/data")
    no_variables.setenv("FMNIST_REGISTRY_ROOT", "s3://b/registry")
    assert (data_root(flags()), registry_root(flags())) == ("s3://b/data", "s3://b/registry")
    given = flags(data_root="/d", registry="/r")
    assert (data_root(given), registry_root(given)) == ("/d", "/r")
    assert feedback_root(given) == "/d/feedback"


def test_a_blank_variable_is_named_not_read_as_a_location(no_variables: pytest.MonkeyPatch, capsys) -> None:
    no_variables.setenv("FMNIST_REGISTRY_ROOT", "  ")
    assert cli.main(["versions"]) == 1
    assert "FMNIST_REGISTRY_ROOT is blank: unset it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["webhook", "http://127.0.0.1:9/hook"], ["automations", "apply"], ["wait-for-api"], ["worker", "--pool", "p"]],
    ids=lambda command: command[0],
)
def test_the_commands_that_talk_to_prefect_refuse_without_its_api(command: list[str], capsys) -> None:
    """Without PREFECT_API_URL, Prefect uses a throwaway database of this machine's: the command would report
    success (a webhook block, automations) and no server would ever see it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert cli.main(command) == 1
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


def test_the_registry_command_reads_the_registry_the_variable_names(
    no_variables: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    no_variables.setenv("FMNIST_REGISTRY_ROOT", str(tmp_path / "team"))
    assert registry_of(flags()).root == str(tmp_path / "team")
    assert cli.main(["--scratch", str(tmp_path / "scratch"), "versions"]) == 0
    assert capsys.readouterr().out == f"No versions in {tmp_path / 'team'}\n"


def test_adding_data_takes_the_defaults_only_in_the_project_folder(no_variables, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not the project folder"):
        deployed_storage(flags(), tmp_path)
    with pytest.raises(ValueError, match="is not the project folder"):  # one root given is not enough
        deployed_storage(flags(data_root=str(tmp_path / "d")), tmp_path)
    (tmp_path / "prefect.yaml").write_text("name: fashion-mnist-pipeline\n")
    storage, source = deployed_storage(flags(registry=str(tmp_path / "r")), tmp_path)
    assert (storage.data_root, storage.registry_root) == (str(tmp_path / "data"), str(tmp_path / "r"))
    assert source == f"the project folder {tmp_path}"


def test_adding_data_anywhere_with_both_roots_given(no_variables, tmp_path: Path) -> None:
    no_variables.setenv("FMNIST_DATA_ROOT", str(tmp_path / "d"))
    storage, source = deployed_storage(flags(registry=str(tmp_path / "r"), incoming=str(tmp_path / "in")), tmp_path)
    assert (storage.data_root, storage.registry_root, storage.incoming) == (
        str(tmp_path / "d"),
        str(tmp_path / "r"),
        str(tmp_path / "in"),
    )
    assert source == "--data-root / --registry, or FMNIST_DATA_ROOT / FMNIST_REGISTRY_ROOT"


def test_a_command_that_uses_no_registry_never_reads_the_registry_flag(monkeypatch, tmp_path: Path, capsys) -> None:
    """main built a Registry for every command: a bad --registry stopped `automations apply` and the worker."""
    from types import SimpleNamespace

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from fmnist.ops import automations

    applied = SimpleNamespace(created=["notify"], updated=[], deleted=[], skipped={})
    monkeypatch.setattr(automations, "apply", lambda *args: applied)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert cli.main(["--registry", "ftp://nowhere/registry", "automations", "apply"]) == 0
    assert capsys.readouterr().out == "created  notify\n"
    assert cli.main(["--registry", "ftp://nowhere/registry", "versions"]) == 1
    assert "'ftp://nowhere/registry': unsupported scheme 'ftp'" in capsys.readouterr().err


def test_review_and_its_submit_work_in_the_storage_the_flags_name(no_variables, tmp_path: Path, capsys) -> None:
    no_variables.delenv("PREFECT_API_URL", raising=False)
    data = tmp_path / "team" / "data"
    labels = np.arange(10, dtype=np.uint8)
    captured(Store(scratch=tmp_path / "s"), str(data / "feedback"), synthetic_images(labels, 5), labels, labels / 10)
    roots = ["--registry", str(tmp_path / "team" / "artifacts"), "--scratch", str(tmp_path / "s")]
    review = [*roots, "review", "--out", str(tmp_path / "review"), "--data-root", str(data)]
    assert cli.main(review) == 0
    assert f"10 captured images from {data / 'feedback'} are in" in capsys.readouterr().out
    assert cli.main([*review, "--submit", "--name", "reviewed"]) == 0
    out = capsys.readouterr().out
    assert f"No verified test set in {data / 'raw'} yet" in out and f"to {data / 'incoming'}: 10 reviewed" in out
    assert (data / "incoming" / "reviewed").is_dir()
