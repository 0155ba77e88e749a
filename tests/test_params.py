"""Every parameter is untrusted (the UI, `--param`, events and the CLI set them): each number has finite
bounds a user would expect, so `inf`, `nan` and absurd values are refused before a run starts."""

from __future__ import annotations

import math
import typing

import pytest
from pydantic import BaseModel, ValidationError

from flows.params import RetrainParams
from fmnist.ops import automations, cli
from fmnist.serving.options import ServeOptions
from fmnist.storage.layout import StorageParams


def numeric_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], type]]:
    """The path and type of every int or float field of `model` and of the models it holds."""
    found = []
    for name, field in model.model_fields.items():
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        if nested := [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]:
            found += numeric_fields(nested[0], (*prefix, name))
        elif number := [k for k in kinds if k in (int, float)]:
            found.append(((*prefix, name), number[0]))
    return found


def _default(model: type[BaseModel], path: tuple[str, ...]) -> object:
    value = model().model_dump(mode="json", by_alias=True)
    for name in path:
        value = value[name]
    return value


def with_value(model: type[BaseModel], path: tuple[str, ...], value: object) -> dict:
    """The model's defaults, as a form sends them, with `value` at `path`."""
    data = model().model_dump(mode="json", by_alias=True)
    inner = data
    for name in path[:-1]:
        inner = inner[name]
    inner[path[-1]] = value
    return data


FIELDS = [
    (model, path, kind)
    for model in (RetrainParams, StorageParams, ServeOptions)
    for path, kind in numeric_fields(model)
]


def test_the_walk_finds_the_numbers_a_user_sets() -> None:
    paths = {".".join(path) for _, path, _ in FIELDS}
    assert {"training_silence_timeout_s", "retention.keep_days", "training.seed", "timeout_s"} <= paths
    assert len(paths) >= 20


@pytest.mark.parametrize(("model", "path", "kind"), FIELDS, ids=[".".join(p) for _, p, _ in FIELDS])
def test_no_number_is_unbounded(model: type[BaseModel], path: tuple[str, ...], kind: type) -> None:
    model.model_validate(with_value(model, path, _default(model, path)))  # the default passes
    values = [math.inf, -math.inf, math.nan, 1e300, -1e300] if kind is float else [10**30, -(10**30)]
    for value in values:
        with pytest.raises(ValidationError) as refused:
            model.model_validate(with_value(model, path, value))
        assert [tuple(e["loc"]) for e in refused.value.errors()] == [path], refused.value


@pytest.mark.parametrize(
    "argv",
    [
        ["automations", "apply", "--heartbeat-s", "0"],
        ["automations", "apply", "--heartbeat-s", "29"],
        ["prune-runs", "--keep-days", "inf"],
        ["prune-runs", "--keep-last", "0"],
        ["serve", "--poll-s", "nan"],
        ["serve", "--port", "70000"],
        ["serve", "--max-connections", "0"],
    ],
)
def test_the_cli_refuses_numbers_out_of_bounds(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    assert refused.value.code == 2 and "is not between" in capsys.readouterr().err


def test_automations_refuse_a_heartbeat_prefect_would_not_send(tmp_path) -> None:
    with pytest.raises(ValueError, match="heartbeat every 0 s: give 30 to 86400 s"):
        automations.apply(tmp_path / "automations.yaml", 0)


def test_every_training_preset_has_a_network_of_its_own() -> None:
    from fmnist.training.model import NETWORKS, Preset

    assert set(typing.get_args(Preset)) == set(NETWORKS), "a preset without its network in NETWORKS cannot be built"
