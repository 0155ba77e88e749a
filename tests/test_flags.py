"""Command-line flags made from a pydantic model's fields (fmnist/ops/flags.py), and serve's from ServeOptions."""

from __future__ import annotations

import argparse

import pytest
from pydantic import BaseModel, Field

from fmnist.ops import cli
from fmnist.ops.flags import add_model_flags, model_from_flags
from fmnist.serving.options import NOT_A_FLAG, ServeOptions


class Options(BaseModel):
    port: int | None = Field(
        8500, ge=0, le=65535, description="a port", json_schema_extra={"off_flag": "--no-port", "off_help": "none"}
    )
    share: float = Field(0.0, ge=0, le=1, description="a share, 100% at most")
    verbose: bool = Field(False, description="say more")
    name: str = Field("x", description="a name")
    root: str | None = Field(None, json_schema_extra=NOT_A_FLAG)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="p")
    add_model_flags(parser, Options)
    return parser.parse_args(argv)


def test_each_field_is_a_flag_with_its_default_and_the_model_is_built_back() -> None:
    args = parse()
    assert (args.port, args.no_port, args.share, args.verbose, args.name) == (8500, False, 0.0, False, "x")
    assert not hasattr(args, "root")  # not a flag
    built = model_from_flags(Options, parse("--port", "9", "--share", "0.5", "--verbose", "--name", "y"), root="/r")
    assert built == Options(port=9, share=0.5, verbose=True, name="y", root="/r")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "65536"], "argument --port: 65536 is not between 0 and 65535"),
        (["--share", "nan"], "argument --share: nan is not between 0 and 1"),
        (["--port", "8.5"], "argument --port: '8.5' is not a int"),
    ],
)
def test_a_bound_is_refused_with_argparse_s_usage_error(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        parse(*argv)
    assert refused.value.code == 2 and message in capsys.readouterr().err


def test_the_off_flag_turns_an_optional_port_off_wherever_it_stands() -> None:
    assert model_from_flags(Options, parse("--no-port", "--port", "9")).port is None
    assert model_from_flags(Options, parse("--port", "9", "--no-port")).port is None


def test_help_is_the_description_with_percent_kept(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    assert "a share, 100% at most" in capsys.readouterr().out


def test_a_bool_flag_on_by_default_is_refused() -> None:
    class On(BaseModel):
        quiet: bool = True

    with pytest.raises(TypeError, match=r"On\.quiet: a bool flag turns an option on"):
        add_model_flags(argparse.ArgumentParser(), On)


def test_serve_has_a_flag_for_each_option_and_no_other_way_to_set_one() -> None:
    serve = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    flags = {a.dest for a in serve._actions} - {"help", "no_grpc", "data_root", "edge", "print_edge_config"}
    assert flags == set(ServeOptions.model_fields) - {"idle_s", "connection_age_s", "feedback_root"}
    defaults = serve.parse_args([])
    assert model_from_flags(ServeOptions, defaults) == ServeOptions()
    assert (
        model_from_flags(ServeOptions, serve.parse_args(["--max-body-mib-in-flight", "3"])).max_body_bytes_in_flight
        == 3 << 20
    )
